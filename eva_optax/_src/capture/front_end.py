"""What the front-ends share around the call: ``argnums``, the pass-through warning."""

from __future__ import annotations

import operator
import sys
import warnings
from typing import Any


from eva_optax._src.statistics import (
  PassThrough,
)


def check_argnums(argnums: Any, front_end: str) -> int:
  """``argnums`` as a non-negative int: the position of the differentiated argument."""
  if isinstance(argnums, bool):  # has_aux given where argnums now stands
    raise TypeError(
      f"{front_end}: argnums={argnums!r} is a bool; the signature is"
      f" {front_end}(loss_fn, argnums=0, has_aux=False, ...), as for"
      " jax.value_and_grad: pass has_aux by name"
    )
  try:
    index = operator.index(argnums)
  except TypeError:
    index = -1
  if index < 0:
    raise TypeError(
      f"{front_end}: argnums must be a non-negative int, the position of the"
      f" argument holding the parameters; got {argnums!r}. Other arguments are"
      " not differentiated: close over them, or differentiate them with"
      " jax.grad around the loss"
    )
  return index


def move_to_front(args: tuple, argnums: int, front_end: str) -> tuple[Any, tuple]:
  """``(args[argnums], the other args)``, checking that there are enough."""
  if len(args) <= argnums:
    raise TypeError(
      f"{front_end} differentiates the positional argument argnums={argnums}, but"
      f" grad_fn got {len(args)} positional argument(s)"
    )
  return args[argnums], args[:argnums] + args[argnums + 1 :]


def put_back(first: Any, rest: tuple, argnums: int) -> tuple:
  """The inverse of :func:`move_to_front`: the arguments in the user's order."""
  return rest[:argnums] + (first,) + rest[argnums:]


class PassThroughWarning(UserWarning):
  """Kernels of modules the capture cannot precondition get the plain gradient.

  Issued once per gradient function and set of such modules, at trace time.
  Silence it with
  ``warnings.filterwarnings('ignore', category=eva_optax.PassThroughWarning)``.
  """


# Frames of these packages are skipped for the line a warning names (under
# jit, the user's call of grad_fn is below JAX's tracing machinery).
_LIBRARY_MODULES = ("eva_optax", "jax", "jaxlib", "flax", "optax", "contextlib", "functools")


def _user_stacklevel() -> int:
  """The ``stacklevel`` of the first frame, above the caller of ``warnings.warn``,
  outside the library, JAX and Flax."""
  frame, level = sys._getframe(2), 2  # the caller of the function that warns
  while frame is not None:
    name = frame.f_globals.get("__name__", "")
    if not any(name == m or name.startswith(m + ".") for m in _LIBRARY_MODULES):
      return level
    frame, level = frame.f_back, level + 1
  return 2


def warn_pass_through(skipped: dict[Any, PassThrough], warned: set, front_end: str) -> None:
  """Warn (:class:`PassThroughWarning`) of the modules in ``skipped``, unless
  this set of modules was already warned of (``warned``, kept by the caller)."""
  if not skipped:
    return
  key = frozenset((tuple(path), entry.kind) for path, entry in skipped.items())
  if key in warned:
    return
  warned.add(key)
  names = ", ".join(
    f"{'/'.join(path) or 'the model itself'} ({entry.kind})"
    for path, entry in sorted(skipped.items(), key=lambda kv: kv[0])
  )
  one = len(skipped) == 1
  warnings.warn(
    f"{front_end}: {len(skipped)} module{'' if one else 's'} owning a kernel"
    f" cannot be preconditioned and {'is' if one else 'are'} passed through:"
    f" {names}. {'Its' if one else 'Their'} parameters get the plain gradient,"
    " a step at the plain learning rate, while the preconditioned layers move at"
    " about learning_rate / damping under Eva. eva_optax.describe(params, stats)"
    " gives the full account: every parameter, its rule, and why each module is"
    " passed through. Silence this with warnings.filterwarnings('ignore',"
    " category=eva_optax.PassThroughWarning).",
    PassThroughWarning,
    stacklevel=_user_stacklevel(),
  )
