"""The sharded decoder of the mesh tests: its meshes, optimizers and compiled steps."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import eva_optax
from examples.harness import sharded

DEVICES = 8
# Wide enough that a kernel or an activation dwarfs the statistics (the traffic checks);
# SMALL: the equality checks, where only the numbers matter.
VOCAB, D_MODEL, HEADS, MLP, SEQ, BATCH = 32, 128, 8, 256, 16, 64
SMALL = dict(d_model=32, heads=4, mlp=64, seq=8, batch=16)
MESHES = {"tp": (2, 4), "fsdp": (8, 1), "model": (1, 8)}
RULES = {"tp": "tp", "fsdp": "fsdp", "model": "tp"}  # model: tensor parallel on 8
OPTIMIZERS = {
  "sgd": (lambda: optax.sgd(0.1, momentum=0.9), None),
  "eva": (lambda: eva_optax.eva(0.1, weight_decay=1e-3), eva_optax.EVA_STATISTICS),
  "eva_foof": (lambda: eva_optax.eva_foof(0.1), eva_optax.EVA_FOOF_STATISTICS),
  "kfac": (lambda: eva_optax.kfac(0.1, inverse_every=2), eva_optax.KFAC_STATISTICS),
  # γ well above float32 rounding too: at the default 0.03, FOOF's one damped inverse
  # of A turns the order of the sums into 1.7e-5 on TP (with A whole on every device
  # as with A split: the same number).
  "foof": (lambda: eva_optax.foof(0.1, inverse_every=2, damping=0.3), eva_optax.FOOF_STATISTICS),
  # ε well above float32 rounding of the statistics: with a tiny ε the float32 roots of
  # nearly singular statistics amplify the order of the sums (2.4e-5 apart on FSDP at
  # the default 1e-6).
  "shampoo": (lambda: eva_optax.shampoo(0.1, damping=1e-4), None),
}
# A kernel, or an activation (batch × seq × width over 8 devices), is at least this large.
LARGE = D_MODEL * D_MODEL
assert BATCH * SEQ * D_MODEL // DEVICES >= LARGE


def model(layers: int, small: bool = False) -> sharded.Decoder:
  if small:
    return sharded.Decoder(
      VOCAB, SMALL["d_model"], SMALL["heads"], SMALL["mlp"], layers, SMALL["seq"]
    )
  return sharded.Decoder(VOCAB, D_MODEL, HEADS, MLP, layers, max_len=SEQ)


def tokens(seed: int, small: bool = False) -> jax.Array:
  shape = (SMALL["batch"], SMALL["seq"] + 1) if small else (BATCH, SEQ + 1)
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def step_fn(model, name):
  make, statistics = OPTIMIZERS[name]
  tx = make()
  loss_fn = sharded.next_token_loss(model)

  def step(params, state, tokens):
    if statistics is None:
      grads = jax.grad(loss_fn)(params, tokens)
      updates, state = tx.update(grads, state, params)
    else:
      extra = {}
      if name in ("kfac", "foof"):
        extra["factors_due"] = eva_optax.factors_due(state)
      grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics)
      _, grads, stats = grad_fn(params, tokens, **extra)
      updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  return tx, step


def setup(parallelism: str, layers: int, name: str, small: bool = False, matrices: str = "split"):
  """The compiled step on the mesh, its params, state and shardings (one per compiler
  setting: a module of ``quick_compiles`` gets its own); ``matrices``: see
  ``eva_optax.state_shardings``."""
  quick = jax.config.read("jax_disable_most_optimizations")
  return _setup(parallelism, layers, name, small, quick, matrices)


@functools.cache
def _setup(parallelism: str, layers: int, name: str, small: bool, quick: bool, matrices: str):
  del quick  # part of the cache key only
  decoder = model(layers, small)
  mesh = sharded.make_mesh(MESHES[parallelism])
  rules = sharded.RULES[RULES[parallelism]]
  first = tokens(0, small)
  tx, step = step_fn(decoder, name)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(decoder.init, jax.random.key(0), first[:, :-1])["params"]
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    init = lambda k: nn.unbox(decoder.init(k, first[:, :-1])["params"])
    params = jax.jit(init, out_shardings=param_shardings)(jax.random.key(0))
    state_shardings = eva_optax.state_shardings(tx, params, matrices=matrices)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    batch = NamedSharding(mesh, P("data"))
    jitted = jax.jit(
      step,
      in_shardings=(param_shardings, state_shardings, batch),
      out_shardings=(param_shardings, state_shardings),
    )
    compiled = jitted.lower(params, state, first).compile()
  return dict(
    mesh=mesh,
    rules=rules,
    tx=tx,
    step=step,
    jitted=jitted,
    compiled=compiled,
    params=params,
    state=state,
    param_shardings=param_shardings,
    state_shardings=state_shardings,
    batch=batch,
  )
