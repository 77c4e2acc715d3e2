"""Checkpoints: a run saved with Orbax and resumed equals the uninterrupted run, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import eva_optax
from models import NormedMLP  # Dense_0, LayerNorm_0 (passed through), Dense_1, Dense_2

jax.config.update("jax_default_matmul_precision", "highest")

STEPS = 6
SAVED_AT = 2  # the K-FAC / FOOF / Shampoo refresh of step 3 comes after the restore

# name: (optimizer factory, statistics to capture (None: plain gradients), gated factors)
OPTIMIZERS = {
  "eva": (lambda: eva_optax.eva(0.05, weight_decay=1e-3), eva_optax.EVA_STATISTICS, False),
  "eva_foof": (
    lambda: eva_optax.eva_foof(0.05, weight_decay=1e-3),
    eva_optax.EVA_FOOF_STATISTICS,
    False,
  ),
  "eva_shampoo": (lambda: eva_optax.eva_shampoo(0.05, stat_decay=0.5), None, False),
  "kfac": (
    lambda: eva_optax.kfac(0.05, stats_every=2, inverse_every=3),
    eva_optax.KFAC_STATISTICS,
    True,
  ),
  "foof": (lambda: eva_optax.foof(0.05, inverse_every=3), eva_optax.FOOF_STATISTICS, True),
  "shampoo": (lambda: eva_optax.shampoo(0.05, inverse_every=3, block_size=4), None, False),
}


@pytest.fixture(scope="module")
def problem():
  model = NormedMLP()
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(STEPS, 8, 4)).astype(np.float32)
  ys = rng.normal(size=(STEPS, 8, 2)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(2), xs[0])["params"]
  loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  return params, loss_fn, xs, ys


def _step_fn(tx, loss_fn, statistics, gated, traces):
  @jax.jit
  def step(p, s, x, y):
    traces.append(1)
    if statistics is None:
      _, grads = jax.value_and_grad(loss_fn)(p, x, y)
      extra = {}
    else:
      kw = dict(factors_due=eva_optax.factors_due(s)) if gated else {}
      _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=statistics)(p, x, y, **kw)
      extra = dict(stats=stats)
    updates, s = tx.update(grads, s, p, **extra)
    return optax.apply_updates(p, updates), s

  return step


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.dtype == v.dtype and u.shape == v.shape
    assert np.array_equal(u, v), "resumed run differs from the uninterrupted run"


def _periodic_part(state):
  """The refreshed cache of the preconditioner (first in the chain), if it has one."""
  inner = state[0]
  return getattr(inner, "cache", getattr(inner, "inverse_roots", None))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumed_run_is_bit_identical(problem, name, tmp_path):
  make, statistics, gated = OPTIMIZERS[name]
  params, loss_fn, xs, ys = problem
  tx = make()
  traces = []
  step = _step_fn(tx, loss_fn, statistics, gated, traces)

  # Uninterrupted.
  p, s = params, tx.init(params)
  for i in range(STEPS):
    p, s = step(p, s, xs[i], ys[i])
    if i + 1 == SAVED_AT:
      saved = (p, s)
  uninterrupted = (p, s)

  # Interrupted: save after SAVED_AT steps, restore into a fresh optimizer's
  # structure (NamedTuple states come back with their types), continue.
  path = tmp_path / name
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, saved)
  fresh = make()
  target = (params, fresh.init(params))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, target)
  _assert_bit_identical(restored, saved)
  assert type(restored[1][0]) is type(saved[1][0])
  p, s = restored
  for i in range(SAVED_AT, STEPS):
    p, s = step(p, s, xs[i], ys[i])

  _assert_bit_identical((p, s), uninterrupted)
  assert len(traces) == 1, "the restored state must not recompile the step"
  assert int(s[0].count) == STEPS
  # Something moved after the restore, periodic caches included.
  assert not np.array_equal(p["Dense_1"]["kernel"], saved[0]["Dense_1"]["kernel"])
  if _periodic_part(s) is not None:
    assert not all(
      np.array_equal(u, v)
      for u, v in zip(jax.tree.leaves(_periodic_part(s)), jax.tree.leaves(_periodic_part(saved[1])))
    )
