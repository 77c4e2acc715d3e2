"""Optimizer-state sizes (``eva_optax.state_bytes``, ``eva_optax._src.memory``), from shapes only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import eva_optax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(30)(nn.relu(nn.Dense(200)(x)))


@pytest.fixture(scope="module")
def params():
  return jax.eval_shape(lambda: MLP().init(jax.random.key(0), jnp.zeros((1, 100))))["params"]


def test_state_bytes_counts_every_leaf(params):
  n_params = 100 * 200 + 200 + 200 * 30 + 30
  # momentum buffer: one float32 per parameter
  assert eva_optax.state_bytes(optax.sgd(0.1, momentum=0.9), params) == 4 * n_params
  # Eva adds a count and, per layer, ā (in) and ḡ (out): O(in + out).
  assert (
    eva_optax.state_bytes(eva_optax.eva(0.1), params)
    == 4 * n_params + 4 * (100 + 200 + 200 + 30) + 4
  )


class Autoencoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    for f in (1000, 500, 250, 30, 250, 500, 1000, 784):
      x = nn.Dense(f)(x)
    return x


@pytest.mark.parametrize("name", ["eva", "eva_foof", "eva_shampoo"])
def test_vectorized_state_within_one_percent_of_sgd(name):
  """On the paper's autoencoder (2.8 M parameters) the vectors add < 1 %."""
  params = jax.eval_shape(lambda: Autoencoder().init(jax.random.key(0), jnp.zeros((1, 784))))[
    "params"
  ]
  sgd = eva_optax.state_bytes(optax.sgd(0.1, momentum=0.9), params)
  got = eva_optax.state_bytes(getattr(eva_optax, name)(0.1), params)
  assert sgd < got <= 1.01 * sgd


def test_kfac_state_holds_matrices(params):
  kfac = eva_optax.state_bytes(eva_optax.kfac(0.1), params)
  # A, G and their inverses: 2·((101² + 200²) + (201² + 30²)) floats on top of momentum.
  assert kfac >= 4 * 2 * (101**2 + 200**2 + 201**2 + 30**2)
