"""Flax Linen models of the examples (and of the step-time benchmark).

- :class:`Autoencoder`: the deep autoencoder of the Eva paper, MLP
  784-1000-500-250-30-250-500-1000-784, ReLU except the linear code and output layers.
- :class:`ResNet`: a CIFAR-style ResNet (He et al., 2016, section 4.2): a 3×3 stem, stages
  of basic residual blocks with BatchNorm, global average pooling and a Dense head.
  ``ResNet(blocks_per_stage=3)`` is ResNet-20; the default 2 blocks per stage is the small
  network of the Fashion-MNIST classifier. :func:`resnet` builds ResNet-``depth`` (6n+2) of
  a given stem width.
- :class:`PlainCNN`: three 3×3 convolutions without BatchNorm, global average pooling and a
  Dense head (the step-time benchmark's ``cnn``).
- :class:`CharTransformer`: a pre-LayerNorm decoder-only transformer for character-level
  language modelling; the blocks are stacked with ``nn.scan`` (one compiled block, kernels
  with a leading layer axis) and the attention projections are ``nn.DenseGeneral``
  (``features=(heads, head_dim)`` for q/k/v, ``axis=(-2, -1)`` for the output).
  ``CharTransformer(vocab=50304, d_model=768, num_heads=12, mlp_dim=3072, num_layers=12,
  max_len=1024)`` is GPT-2 small with an untied head.

``ResNet`` and ``CharTransformer`` take a ``dtype``, the dtype of their computations
(``jnp.bfloat16``: bfloat16 activations; the parameters stay float32). The default
``None`` computes in the dtype of the inputs and parameters, float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

AUTOENCODER_SIZES = (1000, 500, 250, 30, 250, 500, 1000, 784)


class Autoencoder(nn.Module):
  """784-1000-500-250-30-250-500-1000-784 MLP; ReLU except the code and output layers."""

  sizes: Sequence[int] = AUTOENCODER_SIZES
  code_layer: int = 3  # index of the linear 30-unit code layer in ``sizes``

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.sizes):
      x = nn.Dense(width)(x)
      if i != self.code_layer and i != len(self.sizes) - 1:
        x = nn.relu(x)
    return x


def _norm(train: bool, dtype: Any = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype)


class ResidualBlock(nn.Module):
  """Two 3×3 convolutions with BatchNorm; a 1×1 projection when the shape changes."""

  features: int
  strides: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda size, strides=1: nn.Conv(
      self.features, size, strides=strides, use_bias=False, dtype=self.dtype
    )
    y = conv((3, 3), self.strides)(x)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = conv((3, 3))(y)
    y = _norm(train, self.dtype)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = conv((1, 1), self.strides)(x)
      x = _norm(train, self.dtype)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Conv 3×3/``stages[0]``, stages of residual blocks (features, stride), GAP, Dense.

  ``ResNet(RESNET18_STAGES)`` is the CIFAR-style ResNet-18 (stem 3×3/64, stages
  64/128/256/512 of two basic blocks, strides 1/2/2/2).
  """

  stages: Sequence[tuple[int, int]] = ((16, 1), (32, 2), (64, 2))
  blocks_per_stage: int = 2
  num_classes: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = nn.Conv(self.stages[0][0], (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(_norm(train, self.dtype)(x))
    for features, strides in self.stages:
      for b in range(self.blocks_per_stage):
        x = ResidualBlock(features, strides if b == 0 else 1, self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


def depth_to_blocks(depth: int) -> int:
  """Residual blocks per stage of ResNet-``depth``: ``(depth - 2) / 6`` (20 → 3, 56 → 9).

  Raises:
    ValueError: ``depth`` is not 6n+2 with n ≥ 1 (the message names ``--depth``).
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"--depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth}")
  return (depth - 2) // 6


def resnet(depth: int, width: int = 16, dtype: Any = None) -> ResNet:
  """ResNet-``depth`` (He et al., 2016, section 4.2): three stages of ``(depth - 2) / 6``
  basic blocks with ``width``, ``2·width``, ``4·width`` channels and strides 1/2/2.

  ``resnet(20)`` is ResNet-20 (16/32/64 channels); ``resnet(14)`` is ``ResNet()``.

  Raises:
    ValueError: ``depth`` is not 6n+2 with n ≥ 1, or ``width`` is below 1 (the message
      names the flag).
  """
  blocks = depth_to_blocks(depth)
  if width < 1:
    raise ValueError(f"--width must be at least 1, got {width}")
  stages = ((width, 1), (2 * width, 2), (4 * width, 2))
  return ResNet(stages=stages, blocks_per_stage=blocks, dtype=dtype)


class PlainCNN(nn.Module):
  """Three 3x3 convolutions (32 channels, bias, ReLU) without BatchNorm, global average
  pooling, Dense 10: a conv net whose ḡ is not zeroed by a normalisation (the step-time
  benchmark's ``cnn``)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(3):
      x = nn.relu(nn.Conv(32, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with ``nn.DenseGeneral`` projections."""

  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    head_dim = d_model // self.num_heads
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # (B, T, H, D)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    t = x.shape[-2]
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(d_model, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class TransformerBlock(nn.Module):
  """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x)) (GELU)."""

  num_heads: int
  mlp_dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda: nn.LayerNorm(dtype=self.dtype)
    x = x + CausalSelfAttention(self.num_heads, self.dtype)(norm()(x))
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(norm()(x))
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y))
    return x + y


class _ScanStep(nn.Module):
  """``TransformerBlock`` in the ``(carry, x) -> (carry, y)`` form of ``nn.scan``."""

  num_heads: int
  mlp_dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    block = TransformerBlock(self.num_heads, self.mlp_dim, self.dtype, name="block")
    return block(x), None


class CharTransformer(nn.Module):
  """Decoder-only transformer: embeddings + learned positions, blocks, LN, untied head.

  The blocks are stacked with ``nn.scan`` (``scan=True``) or unrolled, one module each.
  """

  vocab: int
  d_model: int = 128
  num_heads: int = 4
  mlp_dim: int = 512
  num_layers: int = 4
  max_len: int = 128
  scan: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab, self.d_model, dtype=self.dtype)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.d_model))
    x = x + pos[: tokens.shape[-1]].astype(x.dtype)
    if self.scan:
      blocks = nn.scan(
        _ScanStep,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.num_layers,
      )
      x, _ = blocks(self.num_heads, self.mlp_dim, self.dtype, name="blocks")(x, None)
    else:
      for _ in range(self.num_layers):
        x = TransformerBlock(self.num_heads, self.mlp_dim, self.dtype)(x)
    return nn.Dense(self.vocab, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x))
