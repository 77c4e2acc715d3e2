"""Parameters sharded the MaxText way: three steps on the mesh equal three on one device.

Every optimizer with a sharded state, under tensor parallelism (data 2 × model 4)
and FSDP (data 8), on the decoder of ``sharded_setup``; float32 at the highest
matmul precision, relative to the Frobenius norm of each parameter. Compiled
with fewer XLA passes (the same programs' values; the collectives are counted
in ``test_sharded_mesh.py``, fully optimised).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from sharded_setup import DEVICES, model, setup, step_fn, tokens

pytestmark = [
  pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8",
  ),
  pytest.mark.usefixtures("quick_compiles"),
]


def _run(compiled, steps=3):
  params, state = compiled["params"], compiled["state"]
  with jax.default_matmul_precision("highest"):
    for s in range(steps):
      batch = jax.device_put(tokens(s + 1, small=True), compiled["batch"])
      params, state = compiled["jitted"](params, state, batch)
  return params


@functools.cache
def _one_device(name: str, layers: int = 1):
  decoder = model(layers, small=True)
  tx, step = step_fn(decoder, name)
  params = nn.unbox(decoder.init(jax.random.key(0), tokens(0, small=True)[:, :-1])["params"])
  state = tx.init(params)
  jitted = jax.jit(step)
  with jax.default_matmul_precision("highest"):
    for s in range(3):
      params, state = jitted(params, state, tokens(s + 1, small=True))
  return params


@pytest.mark.parametrize(
  "parallelism, name, matrices",
  [
    (p, n, "split")
    for p in ("tp", "fsdp")
    for n in ("eva", "eva_foof", "kfac", "foof", "shampoo")
    if (p, n) != ("fsdp", "foof")
  ]
  + [("tp", "kfac", "whole"), ("tp", "shampoo", "whole")]
  # FOOF under FSDP runs in `make bench` (`pytest -m slow`), for suite time.
  + [pytest.param("fsdp", "foof", "split", marks=pytest.mark.slow)],
)
def test_sharded_steps_equal_one_device(parallelism, name, matrices):
  got = _run(setup(parallelism, 1, name, small=True, matrices=matrices))
  want = _one_device(name)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    relative = np.linalg.norm(g - w) / np.linalg.norm(w)
    assert relative <= 1e-5, relative
  moved = max(
    float(np.abs(np.asarray(g) - np.asarray(w)).max())
    for g, w in zip(
      jax.tree.leaves(got),
      jax.tree.leaves(setup(parallelism, 1, name, small=True, matrices=matrices)["params"]),
    )
  )
  assert moved > 1e-3  # the steps did something


@pytest.mark.parametrize(
  "parallelism, name", [("tp", "eva"), ("fsdp", "eva"), ("fsdp", "eva_foof")]
)
def test_plain_jit_compiles_the_step_as_often_as_sgds(parallelism, name):
  """``tx.init`` on the sharded params, then ``jax.jit(step)`` with no shardings: the
  state comes out of a step exactly where init put it, so Eva's step compiles no more
  often than SGD's (whose second compilation is the params' specs written anew:
  ``P(None,)`` comes back as ``P()``)."""

  def run(optimizer):
    compiled = setup(parallelism, 1, optimizer, small=True)
    params = compiled["params"]
    state = compiled["tx"].init(params)
    step = jax.jit(compiled["step"])
    with jax.set_mesh(compiled["mesh"]):
      for s in range(3):
        new_params, new_state = step(
          params, state, jax.device_put(tokens(s + 1, small=True), compiled["batch"])
        )
        if s == 0:
          before = jax.tree.map(lambda x: x.sharding, state[0])
          after = jax.tree.map(lambda x: x.sharding, new_state[0])
        params, state = new_params, new_state
    return step._cache_size(), before, after

  sgd_compilations, _, _ = run("sgd")
  compilations, before, after = run(name)
  assert compilations == sgd_compilations
  assert before == after  # the preconditioner's own state: the very same shardings
