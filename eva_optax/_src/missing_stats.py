"""The error of a layer-wise update that got no statistics, naming the fix.

An update without ``stats=`` has a few usual causes, and each has its own fix:
the gradients came from ``jax.value_and_grad`` / ``nnx.value_and_grad`` (no
capture), ``nnx.Optimizer.update(model, grads)`` was called without them, or
the user did pass them and a wrapper dropped them on the way: ``optax.MultiSteps``
inside ``optax.chain`` (``chain`` wraps it with ``optax.with_extra_args_support``,
which drops extra arguments), or Flax's own ``TrainState.apply_gradients``
(which calls ``tx.update`` without them). The error names the Linen and NNX
routes always, and the wrapper when the Python call stack shows one (read by
module and function name only, on the error path; nothing is imported).
"""

from __future__ import annotations

import sys

_ROUTES = (
  "Capture the statistics with the gradients and pass them on:\n"
  "  Linen: loss, grads, stats = eva_optax.value_and_grad(loss_fn)(params, batch)\n"
  "         updates, opt_state = tx.update(grads, opt_state, params, stats=stats)\n"
  "         (or state.apply_gradients(grads=grads, stats=stats) with eva_optax.TrainState)\n"
  "  NNX:   loss, grads, stats = eva_optax.nnx_value_and_grad(loss_fn)(model, batch)\n"
  "         optimizer.update(model, grads, stats=stats)  (nnx.Optimizer)"
)

_FLAX_TRAIN_STATE = (
  "Here Flax's flax.training.train_state.TrainState.apply_gradients called"
  " tx.update without them: it cannot pass stats= (it would only try to set a"
  " field of that name). Use eva_optax.TrainState, the same TrainState whose"
  " apply_gradients(grads=grads, stats=stats) forwards them."
)

_MULTI_STEPS = (
  "Here optax.MultiSteps called the optimizer without them: it passes stats= on"
  " only as the outermost wrapper, its own update called as"
  " multi.update(grads, state, params, stats=stats); inside optax.chain (or"
  " through multi.gradient_transformation()) the stats are dropped. Make"
  " MultiSteps the outermost wrapper:"
  " optax.MultiSteps(optax.chain(..., eva_optax.eva(...)), every_k_schedule=k)."
)

_DROPPED = (
  "Here a transformation without extra-argument support (wrapped by"
  " optax.with_extra_args_support, e.g. inside optax.chain) dropped stats= before"
  " they reached this update: the wrappers between you and it must all pass"
  " extra arguments on."
)

_NNX_OPTIMIZER = (
  "Here nnx.Optimizer.update was called without stats=: call"
  " optimizer.update(model, grads, stats=stats) with the stats of"
  " eva_optax.nnx_value_and_grad (flax's nnx.value_and_grad captures none)."
)

_UNKNOWN = (
  "If you did pass stats=, a wrapper between you and this update dropped them:"
  " optax.MultiSteps inside optax.chain (make MultiSteps the outermost wrapper,"
  " called with stats=), or Flax's own TrainState.apply_gradients (use"
  " eva_optax.TrainState)."
)


def _callers() -> list[tuple[str, str]]:
  """``(module, qualified function name)`` of every frame calling this one."""
  frames = []
  frame = sys._getframe(1)
  while frame is not None:
    frames.append((frame.f_globals.get("__name__", ""), frame.f_code.co_qualname))
    frame = frame.f_back
  return frames


def _calls(frames: list[tuple[str, str]], package: str, qualname: str) -> bool:
  return any((m == package or m.startswith(package + ".")) and q == qualname for m, q in frames)


def missing_stats_message(who: str) -> str:
  """The error for ``who``'s update called with ``stats=None``, from inside it."""
  frames = _callers()
  causes = []
  if _calls(frames, "flax.training", "TrainState.apply_gradients"):
    causes.append(_FLAX_TRAIN_STATE)
  if _calls(frames, "optax", "MultiSteps.update"):
    causes.append(_MULTI_STEPS)
  elif _calls(frames, "optax", "with_extra_args_support.<locals>.update"):
    causes.append(_DROPPED)
  if not causes and _calls(frames, "flax.nnx", "Optimizer.update"):
    causes.append(_NNX_OPTIMIZER)
  cause = " ".join(causes) or _UNKNOWN
  return (
    f"{who} needs the layer statistics, and this update got none (stats=None). {cause}\n{_ROUTES}"
  )
