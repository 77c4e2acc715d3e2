"""Models, problems and helpers shared by several test modules.

A plain module, imported as ``from models import ...``: pytest puts ``tests/``
on ``sys.path`` (rootdir-based imports, no ``__init__.py``), so no test module
needs to import another one. What one test module alone uses stays in it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from eva_optax._src.layerwise_rule import LayerGradient

# ---------------------------------------------------------------------------
# Flax models.


class NormedMLP(nn.Module):
  """Dense_0, LayerNorm_0 (passed through), Dense_1, Dense_2 (no bias); 4 → 2.

  The checkpoint and composition suites: a pass-through layer between
  preconditioned ones, and a layer without bias.
  """

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.relu(nn.Dense(6)(x)))  # Dense_0, LayerNorm_0 (passed through)
    x = nn.relu(nn.Dense(5)(x))  # Dense_1
    return nn.Dense(2, use_bias=False)(x)  # Dense_2


class TwoLayerMLP(nn.Module):
  """Dense_0 (8) and Dense_1 (3), parameters and activations in ``dtype``."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, dtype=self.dtype, param_dtype=self.dtype)(x))
    return nn.Dense(3, dtype=self.dtype, param_dtype=self.dtype)(x)


# ---------------------------------------------------------------------------
# One layer's gradient, in the library's orientation and the paper's.


def random_layer(rng, in_dim, out_dim, bias):
  """A random layer gradient: ``(LayerGradient (in, out) float32, Ĝ (out, in[+1]) float64)``."""
  kernel = rng.normal(size=(in_dim, out_dim))
  b = rng.normal(size=out_dim) if bias else None
  # Paper orientation Ĝ (out, in[+1]).
  g_hat = np.concatenate([kernel.T, b[:, None]], axis=1) if bias else kernel.T
  grad = LayerGradient(
    jnp.asarray(kernel, jnp.float32), None if b is None else jnp.asarray(b, jnp.float32)
  )
  return grad, g_hat


def paper(p, bias):
  """A Preconditioned result in the paper orientation (out, in[+1])."""
  k = np.asarray(p.kernel, np.float64).T
  return np.concatenate([k, np.asarray(p.bias, np.float64)[:, None]], axis=1) if bias else k


def spd(rng, n, scale=1.0):
  """A random symmetric positive definite ``(n, n)`` matrix of size ``scale``."""
  m = rng.normal(size=(n, n + 2))
  return scale * (m @ m.T) / (n + 2)


def layer_group():
  """Layers of every kind a group may hold: bias or not, stacked or not.

  ``(grads, input means ā, output-gradient means ḡ)``, one entry per layer.
  """
  rng = np.random.default_rng(1)
  shapes = [((), 6, 4, True), ((), 5, 3, False), ((3,), 4, 2, True), ((2,), 3, 5, False)]
  grads, a, g = [], [], []
  for stack, n_in, n_out, bias in shapes:
    k = jnp.asarray(rng.normal(size=stack + (n_in, n_out)), jnp.float32)
    b = jnp.asarray(rng.normal(size=stack + (n_out,)), jnp.float32) if bias else None
    grads.append(LayerGradient(k, b))
    a.append(jnp.asarray(rng.normal(size=stack + (n_in,)), jnp.float32))
    g.append(jnp.asarray(rng.normal(size=stack + (n_out,)) * 0.1, jnp.float32))
  return grads, a, g
