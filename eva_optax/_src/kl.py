"""Global scaling of preconditioned updates: KL clip and KL normalisation.

Both act on all preconditioned layers together through the sum
``Σ_layers ⟨V, Ĝ⟩`` of the preconditioned update ``V`` against the gradient ``Ĝ``.

* KL clip (Eva, ICLR 2023, and K-FAC):

      ν = min(1, sqrt(κ / (η² Σ ⟨V, Ĝ⟩))),   ν = 1 when the sum is ≤ 0,

  with η the current learning rate and κ the clip.
* KL normalisation (the extension, arXiv 2308.02123):

      ν = 1 / sqrt(Σ ⟨V, Ĝ⟩),   ν = 1 when the sum is ≤ 0.
* None (``'none'``): ν = 1, for a preconditioner in front of an optimizer that sets the
  step's scale itself, coordinate by coordinate (``optax.adam``/``adamw``): there a global
  ν would mostly cancel in m/sqrt(v), and act only through ε and by reweighting the
  moments' history step by step (a per-step normalisation of the gradient, not curvature).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_CLIP = "kl_clip"
KL_NORMALISE = "kl_normalise"
NO_SCALING = "none"
_SCALINGS = (KL_CLIP, KL_NORMALISE, NO_SCALING)


def kl_clip_factor(
  update_dot_grad: jax.Array, learning_rate: jax.Array, kl_clip: jax.Array
) -> jax.Array:
  """ν = min(1, sqrt(κ / (η² Σ⟨V, Ĝ⟩))), and 1 when the sum is not positive."""
  # The square root comes last: XLA then computes ν once instead of copying the
  # cheap tail (and the sum over all layers) into every layer's fused update.
  positive = update_dot_grad > 0
  ratio = kl_clip / (jnp.square(learning_rate) * jnp.where(positive, update_dot_grad, 1.0))
  return jnp.sqrt(jnp.where(positive, jnp.minimum(1.0, ratio), 1.0))


def kl_normalise_factor(update_dot_grad: jax.Array) -> jax.Array:
  """ν = 1 / sqrt(Σ⟨V, Ĝ⟩), and 1 when the sum is not positive."""
  return jax.lax.rsqrt(jnp.where(update_dot_grad > 0, update_dot_grad, 1.0))


def scale_factor(
  scaling: str,
  update_dot_grad: jax.Array,
  learning_rate: jax.Array | None,
  kl_clip: jax.Array | None,
) -> jax.Array:
  """The factor ν of the chosen ``scaling`` ('kl_clip', 'kl_normalise' or 'none': 1)."""
  if scaling == KL_CLIP:
    return kl_clip_factor(update_dot_grad, learning_rate, kl_clip)
  if scaling == KL_NORMALISE:
    return kl_normalise_factor(update_dot_grad)
  if scaling == NO_SCALING:
    return jnp.ones_like(update_dot_grad)
  raise ValueError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")


def check_scaling(scaling: str) -> None:
  if scaling not in _SCALINGS:
    raise ValueError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")
