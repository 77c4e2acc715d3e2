"""The peers of the harness's registry: Muon (AdamW for the non-matrix parameters) and
Sophia (its Hessian estimate fed by the step's ``obj_fn``), numbers checked by hand."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples.harness import training
from examples.harness.optimizers import SPEC_BY_KEY, Options

pytestmark = pytest.mark.usefixtures("quick_compiles")


def _params_and_grads():
  rng = np.random.default_rng(0)
  # A kernel gradient with singular values 1, 0.1, 0.01: far from orthogonal.
  u, _ = np.linalg.qr(rng.standard_normal((4, 3)))
  v, _ = np.linalg.qr(rng.standard_normal((3, 3)))
  kernel_grad = (u * np.array([1.0, 0.1, 0.01])) @ v.T  # (in 4, out 3)
  params = {"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  grads = {"Dense_0": {"kernel": jnp.asarray(kernel_grad, jnp.float32),
                       "bias": jnp.asarray([0.5, -2.0, 1e-3], jnp.float32)}}
  return params, grads


def test_muon_orthogonalises_kernels_and_gives_other_parameters_adamw():
  params, grads = _params_and_grads()
  tx = SPEC_BY_KEY["muon"].build(0.1, Options(momentum=0.95, weight_decay=0.0))
  updates, _ = tx.update(grads, tx.init(params), params)
  # The bias: AdamW's first step (Nesterov, no decay), as optax.contrib.muon documents.
  adamw = optax.adamw(0.1, weight_decay=0.0, nesterov=True)
  expected, _ = adamw.update(grads["Dense_0"]["bias"], adamw.init(params["Dense_0"]["bias"]),
                             params["Dense_0"]["bias"])
  np.testing.assert_allclose(updates["Dense_0"]["bias"], expected, rtol=1e-5)
  # The kernel: Newton-Schulz flattens the singular values (100 apart in the gradient).
  s = np.linalg.svd(np.asarray(updates["Dense_0"]["kernel"]), compute_uv=False)
  g = np.linalg.svd(np.asarray(grads["Dense_0"]["kernel"]), compute_uv=False)
  assert g[0] / g[-1] == pytest.approx(100.0, rel=1e-3)
  assert s[0] / s[-1] < 2.0
  # Same directions as the gradient's singular vectors (descent on each).
  assert float(jnp.sum(updates["Dense_0"]["kernel"] * grads["Dense_0"]["kernel"])) < 0


def _sophia_state(state):
  is_sophia = lambda node: isinstance(node, optax.contrib.SophiaState)
  return next(n for n in jax.tree.leaves(state, is_leaf=is_sophia) if is_sophia(n))


def test_sophia_gets_the_batch_loss_from_the_step_and_estimates_the_hessian():
  model = nn.Dense(1)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((16, 3)).astype(np.float32)
  y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype(np.float32)

  def loss_fn(params, model_state, batch):
    inputs, targets = batch
    loss = jnp.mean(jnp.square(model.apply({"params": params}, inputs) - targets))
    return loss, (model_state, {})

  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  spec = SPEC_BY_KEY["sophia"]
  assert spec.capture == "objective"
  tx = spec.build(0.01, Options(momentum=0.9, weight_decay=0.0))
  with pytest.raises(ValueError, match="obj_fn"):  # Sophia cannot run without it
    tx.update(params, tx.init(params), params)
  step = training.make_step(spec, tx, loss_fn)
  state = tx.init(params)
  p, _, state, loss, _ = step(params, {}, state, (x, y))
  # The Hessian of this loss in the bias is exactly 2 (d²/db² of mean (x·w + b - y)²),
  # and Hutchinson's z ⊙ Hz for it is 2 + 2 Σ_j mean(x_j) z_j z_b; the running average
  # after one update is (1 - b2) times that estimate.
  nu = _sophia_state(state).nu
  nu_bias = float(nu["bias"][0]) / (1 - 0.99)
  bound = 2 * float(np.abs(x.mean(axis=0)).sum())
  assert 2 - bound - 1e-4 <= nu_bias <= 2 + bound + 1e-4
  assert all(float(jnp.abs(v).sum()) > 0 for v in jax.tree.leaves(nu))
  # It trains: ten more steps lower the loss.
  first = float(loss)
  for _ in range(10):
    p, _, state, loss, _ = step(p, {}, state, (x, y))
  assert float(loss) < first


def test_authors_kfac_spec_captures_per_sample_factors_and_inverts_in_blocks():
  """'kfac-authors' is K-FAC on factor_rows='samples' statistics with 4-block
  inverses; 'kfac' keeps the textbook factors, so their first steps differ."""
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (8, 5))
  y = jax.random.normal(jax.random.key(1), (8, 3))
  params = model.init(jax.random.key(2), x)["params"]
  loss_fn = lambda p: (jnp.mean((model.apply({"params": p}, x) - y) ** 2), None)
  updates = {}
  for key in ("kfac", "kfac-authors"):
    spec = SPEC_BY_KEY[key]
    (_, _), grads, stats = training._grad_fn(spec, loss_fn)(params)
    assert stats.factor_rows == ("samples" if key == "kfac-authors" else "positions")
    tx = spec.build(0.1, Options())
    updates[key], _ = tx.update(grads, tx.init(params), params, stats=stats)
  assert dict(SPEC_BY_KEY["kfac-authors"].extra)["diag_blocks"] == 4
  assert not np.allclose(updates["kfac"]["kernel"], updates["kfac-authors"]["kernel"], rtol=1e-2)
