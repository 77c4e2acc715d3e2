"""A decoder written the MaxText way, and the meshes it is trained on.

The parameters carry Flax logical axis names (``nn.with_logical_partitioning``),
the activations are pinned with ``nn.with_logical_constraint`` where SGD needs it
(embeddings, residual stream, MLP hidden layer, logits), and a set of logical
axis rules maps the names onto a ``('data', 'model')`` mesh:

* ``data``: data parallelism, every parameter replicated;
* ``tp``: tensor parallelism (Megatron): heads, the MLP's hidden units and the
  vocabulary over ``model``, the batch over ``data``;
* ``fsdp``: fully sharded data parallelism: the batch and the ``embed`` axis of
  every parameter over ``data``.

Nothing here knows eva_optax: the model is the user's, unchanged for any optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

#: Logical axis rules per parallelism (``nn.logical_axis_rules`` form).
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
  "data": (("batch", "data"),),
  "tp": (
    ("batch", "data"),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
  ),
  "fsdp": (
    ("batch", "data"),
    ("embed", "data"),
  ),
}


def _init(names: tuple[str | None, ...], init: Any = None) -> Any:
  return nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), names)


class Attention(nn.Module):
  """Causal multi-head attention; its projections are ``nn.Einsum`` over ``(heads, kv)``
  (Flax's ``DenseGeneral`` initialises a flattened kernel, which cannot carry the three
  logical names)."""

  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    head_dim = d_model // self.num_heads
    proj = lambda name: nn.Einsum(
      (d_model, self.num_heads, head_dim),
      "btd,dhk->bthk",
      use_bias=False,
      kernel_init=_init(("embed", "heads", "kv")),
      name=name,
    )
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    t = x.shape[-2]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return nn.Einsum(
      (self.num_heads, head_dim, d_model),
      "bthk,hkd->btd",
      use_bias=False,
      kernel_init=_init(("heads", "kv", "embed")),
      name="out",
    )(out)


class Block(nn.Module):
  """Pre-LN block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(
      scale_init=_init(("embed",), nn.initializers.ones),
      bias_init=_init(("embed",), nn.initializers.zeros),
      name=name,
    )
    x = x + Attention(self.num_heads, name="attention")(norm("norm1")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = nn.Dense(
      self.mlp_dim,
      kernel_init=_init(("embed", "mlp")),
      bias_init=_init(("mlp",), nn.initializers.zeros),
      name="up",
    )(norm("norm2")(x))
    y = nn.with_logical_constraint(nn.gelu(y), ("batch", "length", "mlp"))
    y = nn.Dense(
      x.shape[-1],
      kernel_init=_init(("mlp", "embed")),
      bias_init=_init(("embed",), nn.initializers.zeros),
      name="down",
    )(y)
    return nn.with_logical_constraint(x + y, ("batch", "length", "embed"))


class Decoder(nn.Module):
  """Token and position embeddings, ``num_layers`` blocks, a final LayerNorm, an untied head."""

  vocab: int
  d_model: int = 64
  num_heads: int = 4
  mlp_dim: int = 256
  num_layers: int = 2
  max_len: int = 64

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(
      self.vocab,
      self.d_model,
      embedding_init=_init(("vocab", "embed"), nn.initializers.normal(1.0)),
      name="embed",
    )(tokens)
    pos = self.param(
      "pos_embedding",
      _init(("length", "embed"), nn.initializers.normal(0.02)),
      (self.max_len, self.d_model),
    )
    x = x + pos[: tokens.shape[-1]]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for i in range(self.num_layers):
      x = Block(self.num_heads, self.mlp_dim, name=f"block{i}")(x)
    x = nn.LayerNorm(
      scale_init=_init(("embed",), nn.initializers.ones),
      bias_init=_init(("embed",), nn.initializers.zeros),
      name="norm",
    )(x)
    logits = nn.Dense(
      self.vocab,
      kernel_init=_init(("embed", "vocab")),
      bias_init=_init(("vocab",), nn.initializers.zeros),
      name="head",
    )(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def make_mesh(shape: tuple[int, int], devices: Any = None) -> Mesh:
  """A ``('data', 'model')`` mesh of ``shape`` over the first ``prod(shape)`` devices."""
  devices = jax.devices() if devices is None else devices
  n = shape[0] * shape[1]
  if len(devices) < n:
    raise ValueError(
      f"a {shape[0]}x{shape[1]} mesh needs {n} devices, {len(devices)} are visible"
      " (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
    )
  return Mesh(np.asarray(devices[:n]).reshape(shape), ("data", "model"))


def next_token_loss(model: Decoder):
  """``loss_fn(params, tokens)``: the mean next-token cross entropy."""

  def loss_fn(params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    targets = jax.nn.one_hot(tokens[:, 1:], logits.shape[-1])
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))

  return loss_fn
