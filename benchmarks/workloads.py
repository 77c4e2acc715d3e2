"""The step-time benchmark's workloads: the examples' models (``examples/harness/models.py``)
on synthetic random data, each a loss in the examples' form and an initialiser.

A :class:`Workload` holds ``loss_fn(params, model_state, batch) -> (loss, (model_state,
metrics))``, with ``model_state`` the non-trained collections (BatchNorm statistics, or
``{}``), ``init(key) -> (params, model_state)``, the batch and the learning rate.
:data:`WORKLOADS` names them (``python -m benchmarks.step_time --workloads``); the models and
their sizes are listed in ``benchmarks/step_time.py``'s docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from examples.harness import training
from examples.harness.models import RESNET18_STAGES, Autoencoder, CharTransformer, PlainCNN, ResNet


@dataclasses.dataclass
class Workload:
  name: str
  description: str
  loss_fn: training.LossFn
  init: Callable[[jax.Array], tuple[Any, Any]]
  batch: Any
  learning_rate: float


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)  # the loss in float32 also for bfloat16 models
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def autoencoder(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  model = Autoencoder()
  batch = jax.random.uniform(key, (1000, 784), jnp.float32)

  def loss_fn(params, state, batch):
    out = model.apply({"params": params}, batch)
    return jnp.mean(jnp.square(out - batch)), (state, {})

  return Workload(
    "autoencoder",
    "MLP 784-1000-500-250-30-250-500-1000-784, MSE, batch 1000",
    loss_fn,
    lambda k: (model.init(k, batch[:1])["params"], {}),
    batch,
    0.01,
  )


def _resnet(
  name: str,
  description: str,
  model: ResNet,
  key: jax.Array,
  shape: tuple[int, ...],
  learning_rate: float,
) -> Workload:
  k_x, k_y = jax.random.split(key)
  x = jax.random.normal(k_x, shape, jnp.float32)
  y = jax.random.randint(k_y, shape[:1], 0, model.num_classes)

  def init(k):
    variables = model.init(k, x[:2], train=False)
    return variables["params"], variables["batch_stats"]

  def loss_fn(params, batch_stats, batch):
    images, labels = batch
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
    )
    return _cross_entropy(logits, labels), (updates["batch_stats"], {})

  return Workload(name, description, loss_fn, init, (x, y), learning_rate)


def cnn(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  model = PlainCNN()
  k_x, k_y = jax.random.split(key)
  x = jax.random.normal(k_x, (128, 28, 28, 1), jnp.float32)
  y = jax.random.randint(k_y, (128,), 0, 10)

  def loss_fn(params, state, batch):
    return _cross_entropy(model.apply({"params": params}, batch[0]), batch[1]), (state, {})

  return Workload(
    "cnn",
    "3x Conv 3x3/32 with bias, no BatchNorm, GAP, Dense 10; 28x28x1, batch 128",
    loss_fn,
    lambda k: (model.init(k, x[:1])["params"], {}),
    (x, y),
    0.05,
  )


def resnet(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  return _resnet(
    "resnet",
    "ResNet-style CNN 16/32/64 x2 blocks + BatchNorm, 28x28x1, batch 128",
    ResNet(),
    key,
    (128, 28, 28, 1),
    0.05,
  )


def resnet18(
  key: jax.Array, tiny: bool = False, dtype: Any = None, batch_size: int = 128
) -> Workload:
  stages = tuple((c // 8, s) for c, s in RESNET18_STAGES) if tiny else RESNET18_STAGES
  batch_size = 4 if tiny else batch_size
  widths = "/".join(str(c) for c, _ in stages)
  return _resnet(
    "resnet18",
    f"ResNet-18 (CIFAR) {widths} x2 blocks + BatchNorm, 32x32x3, batch"
    f" {batch_size}, {jnp.dtype(dtype or jnp.float32).name}" + (" (tiny)" if tiny else ""),
    ResNet(stages, dtype=dtype),
    key,
    (batch_size, 32, 32, 3),
    0.1,
  )


def _lm(
  name: str,
  description: str,
  model: CharTransformer,
  key: jax.Array,
  batch_size: int,
  seq: int,
  learning_rate: float,
) -> Workload:
  tokens = jax.random.randint(key, (batch_size, seq + 1), 0, model.vocab)

  def loss_fn(params, state, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return _cross_entropy(logits, tokens[:, 1:]), (state, {})

  init = lambda k: (model.init(k, tokens[:1, :-1])["params"], {})
  return Workload(name, description, loss_fn, init, tokens, learning_rate)


def transformer(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  return _lm(
    "transformer",
    "pre-LN transformer 4x(d256, 4 heads, MLP 1024), seq 128, batch 16, vocab 256",
    CharTransformer(vocab=256, d_model=256, mlp_dim=1024, scan=False),
    key,
    16,
    128,
    0.01,
  )


def gpt(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  if tiny:
    layers, d, heads, mlp, seq, batch, vocab = 2, 64, 4, 256, 32, 2, 512
  else:
    layers, d, heads, mlp, seq, batch, vocab = 12, 768, 12, 3072, 512, 8, 32768
  model = CharTransformer(
    vocab=vocab,
    d_model=d,
    num_heads=heads,
    mlp_dim=mlp,
    num_layers=layers,
    max_len=seq,
    scan=False,
    dtype=dtype,
  )
  return _lm(
    "gpt",
    f"GPT-style LM {layers}x(d{d}, {heads} heads, MLP {mlp}), seq {seq}, batch"
    f" {batch}, vocab {vocab}, {jnp.dtype(dtype or jnp.float32).name}"
    + (" (tiny)" if tiny else ""),
    model,
    key,
    batch,
    seq,
    3e-3,
  )


def _variant(factory: Callable[..., Workload], name: str, **kwargs: Any) -> Callable:
  def make(key: jax.Array, tiny: bool = False) -> Workload:
    w = factory(key, tiny, **kwargs)
    return dataclasses.replace(w, name=name)

  return make


WORKLOADS: dict[str, Callable[[jax.Array, bool], Workload]] = {
  "autoencoder": _variant(autoencoder, "autoencoder"),
  "resnet": _variant(resnet, "resnet"),
  "transformer": _variant(transformer, "transformer"),
  "cnn": _variant(cnn, "cnn"),
  "resnet18": _variant(resnet18, "resnet18"),
  "resnet18-bf16": _variant(resnet18, "resnet18-bf16", dtype=jnp.bfloat16),
  "resnet18-b512": _variant(resnet18, "resnet18-b512", batch_size=512),
  "resnet18-b512-bf16": _variant(
    resnet18, "resnet18-b512-bf16", batch_size=512, dtype=jnp.bfloat16
  ),
  "gpt": _variant(gpt, "gpt"),
  "gpt-bf16": _variant(gpt, "gpt-bf16", dtype=jnp.bfloat16),
}
DEFAULT_WORKLOADS = ("autoencoder", "resnet", "transformer")
