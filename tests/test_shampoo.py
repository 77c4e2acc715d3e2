"""Blocked Shampoo against NumPy eigendecompositions, its block structure and periodic roots."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_optax._src.shampoo import (
  BlockLayout,
  ScaleByShampooState,
  block_layout,
  merge_small_dims,
  scale_by_shampoo,
  shampoo,
)


# ---------------------------------------------------------------------------
# An independent NumPy Shampoo (float64, uneven blocks, no padding).


def _np_statistic(block, i):
  """G_(i) G_(i)ᵀ: the matricisation along dimension i times its transpose."""
  mat = np.moveaxis(block, i, 0).reshape(block.shape[i], -1)
  return mat @ mat.T


def _np_root(statistic, damping, exponent):
  eigenvalues, eigenvectors = np.linalg.eigh(statistic)
  scale = (np.maximum(eigenvalues, 0.0) + damping) ** (-1.0 / exponent)
  return (eigenvectors * scale) @ eigenvectors.T


def _np_precondition(block, roots):
  for i, root in enumerate(roots):
    block = np.moveaxis(np.tensordot(root, block, axes=([1], [i])), 0, i)
  return block


def _np_statistics(grads, stat_decay):
  weight = 1.0 if stat_decay == 1.0 else 1.0 - stat_decay
  stats = [np.zeros((d, d)) for d in grads[0].shape]
  for g in grads:
    g = g.astype(np.float64)
    stats = [stat_decay * s + weight * _np_statistic(g, i) for i, s in enumerate(stats)]
  return stats


def _graft(direction, grad):
  return direction * np.linalg.norm(grad) / np.linalg.norm(direction)


def _grads(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]


def _run_single(tx, grads):
  """Updates and states of ``tx`` on one parameter, one per gradient."""
  state = tx.init(jnp.zeros(grads[0].shape))
  updates, states = [], []
  for g in grads:
    u, state = tx.update(jnp.asarray(g), state)
    updates.append(np.asarray(u))
    states.append(state)
  return updates, states


# ---------------------------------------------------------------------------
# Shapes.


def test_merge_small_dims_matches_reference_examples():
  assert merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 1024) == (1024, 2048, 12)
  assert merge_small_dims((1, 2, 768, 1, 2048), 1024) == (2, 768, 2048)
  assert merge_small_dims((3, 3, 64, 128), 128) == (9, 64, 128)
  assert merge_small_dims((1, 300), 128) == (300,)


def test_block_layout_of_a_tall_kernel():
  layout = block_layout((300, 7), 128)
  assert layout == BlockLayout(merged_shape=(300, 7), block_shape=(128, 7), grid=(3, 1))
  assert layout.num_blocks == 3
  for shape in [(7,), (), (4, 8), (1, 300), (0, 5)]:
    assert block_layout(shape, 128) is None, shape


# ---------------------------------------------------------------------------
# The rule.


@pytest.mark.parametrize(
  "shape, block_size, stat_decay",
  [((12, 10), 16, 1.0), ((12, 10), 16, 0.5), ((6, 5, 4), 8, 1.0)],
)
def test_roots_and_update_equal_numpy_eigendecomposition(shape, block_size, stat_decay):
  damping = 1e-3
  grads = _grads(shape, steps=3)
  tx = scale_by_shampoo(
    block_size=block_size, damping=damping, stat_decay=stat_decay, inverse_every=1
  )
  updates, states = _run_single(tx, grads)
  state = states[-1]
  k = len(shape)
  stats = _np_statistics(grads, stat_decay)
  roots = [_np_root(s, damping, 2 * k) for s in stats]
  for i in range(k):
    assert state.statistics[i].shape == (1, shape[i], shape[i])
    np.testing.assert_allclose(state.statistics[i][0], stats[i], rtol=1e-5, atol=1e-5)
    scale = np.abs(roots[i]).max()
    np.testing.assert_allclose(state.inverse_roots[i][0], roots[i], rtol=1e-3, atol=1e-4 * scale)
  g = grads[-1].astype(np.float64)
  expected = _graft(_np_precondition(g, roots), g)
  np.testing.assert_allclose(updates[-1], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
  assert not np.allclose(updates[-1], g, rtol=1e-2, atol=1e-2)


def test_blocks_are_preconditioned_separately_and_grafted_per_tensor():
  damping, block_size = 1e-2, 128
  grads = _grads((300, 7), steps=2, seed=1)
  tx = scale_by_shampoo(block_size=block_size, damping=damping, inverse_every=1)
  updates, states = _run_single(tx, grads)
  state = states[-1]
  assert [s.shape for s in state.statistics] == [(3, 128, 128), (3, 7, 7)]
  assert [s.shape for s in state.inverse_roots] == [(3, 128, 128), (3, 7, 7)]
  # The last block holds rows 256..299: its padded rows and columns stay zero.
  np.testing.assert_array_equal(state.statistics[0][2, 44:, :], 0.0)
  np.testing.assert_array_equal(state.statistics[0][2, :, 44:], 0.0)

  rows = [slice(0, 128), slice(128, 256), slice(256, 300)]
  directions = []
  for b, r in enumerate(rows):
    block_grads = [g[r] for g in grads]
    stats = _np_statistics(block_grads, 1.0)
    roots = [_np_root(s, damping, 4) for s in stats]
    n = r.stop - r.start
    np.testing.assert_allclose(state.statistics[0][b, :n, :n], stats[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(state.statistics[1][b], stats[1], rtol=1e-5, atol=1e-4)
    directions.append(_np_precondition(block_grads[-1].astype(np.float64), roots))
  g = grads[-1].astype(np.float64)
  expected = _graft(np.concatenate(directions, axis=0), g)  # one norm for the whole tensor
  np.testing.assert_allclose(updates[-1], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


def test_merged_rank_one_parameters_pass_through():
  rng = np.random.default_rng(2)
  shapes = {"bias": (7,), "scale": (), "small": (4, 8), "row": (1, 300)}
  grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  tx = scale_by_shampoo()
  state = tx.init(jax.tree.map(jnp.zeros_like, grads))
  assert all(isinstance(v, optax.MaskedNode) for v in state.statistics.values())
  updates, new_state = tx.update(grads, state)
  jax.tree.map(np.testing.assert_array_equal, updates, grads)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


# ---------------------------------------------------------------------------
# Periodic roots under one compilation.


def test_roots_refresh_exactly_every_n_steps_with_one_compilation():
  every, damping = 3, 1e-3
  grads = _grads((12, 10), steps=7, seed=4)
  tx = scale_by_shampoo(block_size=16, damping=damping, inverse_every=every)
  traces = []

  @jax.jit
  def step(grad, state):
    traces.append(1)
    return tx.update(grad, state)

  state = tx.init(jnp.zeros((12, 10)))
  roots, updates = [], []
  for g in grads:
    u, state = step(jnp.asarray(g), state)
    roots.append([np.asarray(r) for r in state.inverse_roots])
    updates.append(np.asarray(u))
  assert len(traces) == 1
  assert step._cache_size() == 1

  identity = [np.eye(12)[None], np.eye(10)[None]]
  previous = identity
  for t in range(len(grads)):
    same = all(np.array_equal(a, b) for a, b in zip(roots[t], previous))
    assert same == (t % every != 0), t
    previous = roots[t]

  # Step 4 uses the roots of step 3 (statistics of grads 0..3) on its own gradient.
  stats = _np_statistics(grads[:4], 1.0)
  np_roots = [_np_root(s, damping, 4) for s in stats]
  for got, want in zip(roots[4], np_roots):
    np.testing.assert_allclose(got[0], want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
  g = grads[4].astype(np.float64)
  expected = _graft(_np_precondition(g, np_roots), g)
  np.testing.assert_allclose(updates[4], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


# ---------------------------------------------------------------------------
# Composition and the optax contract.


def _params_and_grads(steps=3, seed=5):
  rng = np.random.default_rng(seed)
  params = {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(10,)), jnp.float32),
    },
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
  }
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    for _ in range(steps)
  ]
  return params, grads


def _run(tx, steps=3):
  params, grads = _params_and_grads(steps)
  state, update = tx.init(params), jax.jit(tx.update)  # one compile, not one per op and step
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_alias_with_nesterov_equals_chain():
  lr, wd = 0.1, 5e-4
  kw = dict(block_size=16, damping=1e-4, inverse_every=2)
  alias, state = _run(shampoo(lr, weight_decay=wd, **kw))
  chained, _ = _run(
    optax.chain(
      scale_by_shampoo(**kw),
      optax.add_decayed_weights(wd),
      optax.sgd(lr, momentum=0.9, nesterov=True),
    )
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), alias, chained)
  assert isinstance(state[0], ScaleByShampooState)
  assert [s.shape for s in state[0].statistics["conv"]["kernel"]] == [(1, 9, 9), (1, 8, 8)]


def test_inject_hyperparams_needs_static_block_size():
  kw = dict(weight_decay=1e-3, damping=1e-4, block_size=16, inverse_every=2)
  plain, _ = _run(shampoo(0.1, **kw))
  injected, _ = _run(optax.inject_hyperparams(shampoo, static_args=("block_size",))(0.1, **kw))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), plain, injected)

  params, grads = _params_and_grads(steps=1)
  tx = optax.inject_hyperparams(shampoo)(0.1, **kw)
  with pytest.raises(ValueError, match="block_size"):
    jax.jit(tx.update)(grads[0], tx.init(params), params)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(block_size=0), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(block_size=True), "block_size"),
    (dict(inverse_every=0), "inverse_every"),
    (dict(damping=0.0), "damping"),
    (dict(damping=float("nan")), "damping"),
    (dict(stat_decay=1.5), "stat_decay"),
    (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
  ],
)
def test_bad_hyperparameters_name_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=name):
    shampoo(0.1, **kwargs)


# ---------------------------------------------------------------------------
# Regression: batched LAPACK calls next to each other used to deadlock the CPU
# backend (the first step of the alias on the autoencoder never returned). Run
# in a subprocess so that a hang fails the test instead of stalling the suite.

_AUTOENCODER_STEP = """
import jax, jax.numpy as jnp, optax, eva_optax
sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
params = {f"l{i}": {"w": jnp.full((a, b), 0.01), "b": jnp.zeros(b)}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
tx = eva_optax.shampoo(0.1)
updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
jax.block_until_ready(updates)
from eva_optax._src.linalg import spd_inverse
mats = [jnp.eye(128)[None].repeat(56, 0) * (i + 2.0) for i in range(16)]
out = jax.jit(lambda ms: [spd_inverse(m) for m in ms])(mats)
assert all(bool(jnp.allclose(o[0], jnp.eye(128) / (i + 2.0))) for i, o in enumerate(out))
print("done")
"""


def test_many_batched_roots_and_inverses_in_one_program_finish():
  result = subprocess.run(
    [sys.executable, "-c", _AUTOENCODER_STEP],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "done"


# ---------------------------------------------------------------------------
# float64, and Shampoo as the authors' code runs it (shampoo/shampoo.py of
# lzhangbv/eva): PyTorch's dimension order, their momentum, their weight decay.


@pytest.fixture()
def x64():
  """float64 on, and fewer XLA passes for these small programs compiled once."""
  flags = ("jax_enable_x64", "jax_disable_most_optimizations")
  before = [jax.config.read(f) for f in flags]
  for f in flags:
    jax.config.update(f, True)
  yield
  for f, value in zip(flags, before):
    jax.config.update(f, value)


def test_float64_statistics_roots_and_damping_stay_float64(x64):
  # Eigenvalues from 1e-6 to 1: a float32 eigh (or ε = 0.03 read in float32)
  # would leave errors of 1e-7 to 1e-3 in P; float64 leaves ~1e-13.
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  grad = (q * np.logspace(-3, 0, 6)) @ rng.normal(size=(6, 5))
  damping = 0.03
  tx = scale_by_shampoo(damping=damping, inverse_every=1, block_size=6)
  state = tx.init(jnp.zeros((6, 5), jnp.float64))
  update, state = jax.jit(tx.update)(jnp.asarray(grad), state)
  roots = state.inverse_roots
  assert update.dtype == jnp.float64
  assert all(x.dtype == jnp.float64 for x in state.statistics + roots)
  stats = [_np_statistic(grad, i) for i in range(2)]
  for root, stat in zip(roots, stats):
    np.testing.assert_allclose(root[0], _np_root(stat, damping, 4), rtol=1e-12, atol=1e-12)
  want = _graft(_np_precondition(grad, [_np_root(s, damping, 4) for s in stats]), grad)
  np.testing.assert_allclose(update, want, rtol=1e-11, atol=1e-13)


def _torch_order(x):
  """A Flax kernel (…, I, O) in PyTorch's order (O, I, …); other arrays as they are."""
  return x if x.ndim < 2 else np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))


def _from_torch_order(x):
  return x if x.ndim < 2 else np.transpose(x, (*range(2, x.ndim), 1, 0))


class _AuthorsShampoo:
  """The authors' Shampoo step in float64 NumPy, on a tensor in PyTorch's order:
  merge small dims, split every dimension into blocks of ``block_size`` (the last
  shorter), L_i += G_(i) G_(i)ᵀ per block, roots every step (ε absolute, eigh),
  G contracted with P_1 … P_k one axis at a time, grafted to ‖G‖, λW added to the
  grafted direction (and a second time where nothing is preconditioned: both of
  their directions are then the gradient tensor), buf ← μ·buf + d twice, W ← W − η·buf.
  With ``ridge``, their ridge (``ComputePower`` of their matrix_functions.py): L_i = εI
  at the start, L_i += ε·λ_max(L_i)·I in place at every root, P_i = L_i^(−1/(2k))."""

  def __init__(self, w, lr, mu, wd, damping, block_size, ridge=False):
    self.w, self.lr, self.mu, self.wd, self.eps, self.ridge = w, lr, mu, wd, damping, ridge
    self.merged = list(merge_small_dims(w.shape, block_size))
    self.buf = np.zeros_like(w)
    k = len(self.merged)
    self.splits = [list(range(block_size, d, block_size)) for d in self.merged]
    self.stats = None if k < 2 else {}

  def _blocks(self, g):
    blocks = {(): g}
    for axis, cuts in enumerate(self.splits):
      blocks = {
        key + (j,): part
        for key, b in blocks.items()
        for j, part in enumerate(np.split(b, cuts, axis=axis))
      }
    return blocks

  def step(self, g):
    if self.stats is None:
      d = g + self.wd * self.w + self.wd * self.w
    else:
      blocks = self._blocks(g.reshape(self.merged))
      out = {}
      for key, b in blocks.items():
        start = [self.eps * np.eye(n) if self.ridge else 0.0 for n in b.shape]
        stats = self.stats.setdefault(key, start)
        for i in range(b.ndim):
          other = [j for j in range(b.ndim) if j != i]
          stats[i] = stats[i] + np.tensordot(b, b, (other, other))
        roots = []
        for i, n in enumerate(b.shape):
          if self.ridge:
            stats[i] = stats[i] + self.eps * np.linalg.eigvalsh(stats[i])[-1] * np.eye(n)
            roots.append(_np_root(stats[i], 0.0, 2 * b.ndim))
          else:
            roots.append(_np_root(stats[i], self.eps, 2 * b.ndim))
        p = b
        for root in roots:  # contracts axis 0 and appends the result last
          p = np.tensordot(p, root, ([0], [0]))
        out[key] = p
      for axis in reversed(range(len(self.merged))):
        groups = {}
        for key in sorted(out):
          groups.setdefault(key[:axis], []).append(out[key])
        out = {key: np.concatenate(parts, axis=axis) for key, parts in groups.items()}
      direction = out[()].reshape(g.shape)
      d = direction * np.linalg.norm(g) / np.linalg.norm(direction) + self.wd * self.w
    self.buf = self.mu * self.buf + d
    self.buf = self.mu * self.buf + d
    self.w = self.w - self.lr * self.buf


def _authors_problem(steps=4):
  rng = np.random.default_rng(7)
  shapes = {
    "conv": {"kernel": (3, 3, 3, 8), "bias": (8,)},  # OIHW [72, 3] with block 80; HWIO (27, 8)
    "dense": {"kernel": (100, 6), "bias": (6,)},  # (6, 100): blocks 6×80 and 6×20
    "small": {"kernel": (4, 5)},  # merged (20,): not preconditioned
  }
  params = jax.tree.map(
    lambda s: rng.normal(size=s), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(steps)]
  return params, grads


def test_authors_options_equal_their_shampoo_in_float64(x64):
  lr, mu, wd, eps, block = 0.1, 0.9, 0.05, 1e-3, 80
  params, grads = _authors_problem()
  leaves, treedef = jax.tree.flatten(params)

  def reference(ridge):
    refs = [_AuthorsShampoo(_torch_order(w), lr, mu, wd, eps, block, ridge) for w in leaves]
    for g in grads:
      for ref, x in zip(refs, treedef.flatten_up_to(g)):
        ref.step(_torch_order(x))
    return refs, treedef.unflatten([_from_torch_order(r.w) for r in refs])

  refs, want = reference(ridge=True)
  _, want_absolute = reference(ridge=False)

  def run(params, grads, **options):
    tx = shampoo(
      lr,
      momentum=mu,
      weight_decay=wd,
      damping=eps,
      block_size=block,
      inverse_every=1,
      **(
        {
          "nesterov": "authors",
          "dim_order": "torch",
          "decay_unpreconditioned_twice": True,
          "ridge": "authors",
        }
        | options
      ),
    )
    p = jax.tree.map(jnp.asarray, params)
    state, update = tx.init(p), jax.jit(tx.update)
    for g in grads:
      u, state = update(jax.tree.map(jnp.asarray, g), state, p)
      p = optax.apply_updates(p, u)
    return p, state

  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  got, state = run(params, grads)
  jax.tree.map(close, got, want)
  # The ridge stays in the stored statistics (their in-place add), which start at εI.
  dense = next(r for r, w in zip(refs, leaves) if w is params["dense"]["kernel"]).stats
  for i, stat in enumerate(state[0][0].statistics["dense"]["kernel"]):
    for j in range(2):  # the second block: 20 of its padded 80 rows
      n = len(dense[(0, j)][i])
      close(stat[j][:n, :n], dense[(0, j)][i])
  # The options where they matter: the conv's grouping (OIHW [72, 3], not HWIO
  # (27, 8)), the dense kernel's blocks, and λW twice on the small kernel.
  assert [s.shape for s in state[0][0].statistics["conv"]["kernel"]] == [(1, 72, 72), (1, 3, 3)]
  assert [s.shape for s in state[0][0].statistics["dense"]["kernel"]] == [(2, 6, 6), (2, 80, 80)]
  stored = shampoo(lr, block_size=block, dim_order="stored").init(params)
  assert [s.shape for s in stored[0].statistics["conv"]["kernel"]] == [(1, 27, 27), (1, 8, 8)]
  # Without the options (in one run): λW once on the small kernel; ε absolute (the
  # default), the dense kernel follows the reference with ε absolute, not theirs.
  part = lambda tree: {k: tree[k] for k in ("small", "dense")}
  off, _ = run(
    part(params),
    [part(g) for g in grads],
    decay_unpreconditioned_twice=False,
    ridge="absolute",
  )
  assert np.abs(off["small"]["kernel"] - want["small"]["kernel"]).max() > 1e-2
  close(off["dense"]["kernel"], want_absolute["dense"]["kernel"])
  assert np.abs(off["dense"]["kernel"] - want["dense"]["kernel"]).max() > 1e-2


def test_authors_ridge_changes_the_statistics_at_refresh_steps_only(x64):
  # ridge='authors', roots every 2nd step: L = εI + Σ GGᵀ, plus ε·λ_max(L)·I at
  # steps 0 and 2 (not 1), and P = L^(−1/4) of the refreshed L.
  eps, rng = 1e-2, np.random.default_rng(3)
  grads = rng.normal(size=(3, 6, 5))
  tx = scale_by_shampoo(damping=eps, inverse_every=2, block_size=6, ridge="authors")
  state = tx.init(jnp.zeros((6, 5), jnp.float64))
  update = jax.jit(tx.update)
  want = [eps * np.eye(6), eps * np.eye(5)]
  for step, g in enumerate(grads):
    _, state = update(jnp.asarray(g), state)
    want = [w + _np_statistic(g, i) for i, w in enumerate(want)]
    if step % 2 == 0:
      want = [w + eps * np.linalg.eigvalsh(w)[-1] * np.eye(len(w)) for w in want]
      roots = [_np_root(w, 0.0, 4) for w in want]
    for got, w in zip(state.statistics, want):
      np.testing.assert_allclose(got[0], w, rtol=1e-12)
  for got, root in zip(state.inverse_roots, roots):
    np.testing.assert_allclose(got[0], root, rtol=1e-10)


def test_bad_dim_order_and_ridge_are_refused():
  with pytest.raises(ValueError, match="dim_order"):
    shampoo(0.1, dim_order="oihw")
  with pytest.raises(ValueError, match="ridge"):
    shampoo(0.1, ridge="relative")
