"""Eva's step stays close to SGD's in compiled operations (kernel launches on a GPU).

A behaviour suite across the rules and the capture: the rules do their
per-layer vector work for all layers at once (:mod:`eva_optax.segments`), one
pass over each gradient matrix, and the rank-one correction fused into the
update; the capture takes a convolution's ā with one matrix product instead of
a second convolution. These tests count the top-level operations of the
compiled step on the present backend (load-independent) and fail if the count
per layer grows back; the grouped rules are checked against the per-layer ones
in test_eva.py and test_eva_foof.py, the segment sums in test_segments.py and
the convolution-free ā in test_capture.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import eva_optax

from examples.harness.compiled_ops import count_ops, entry_opcodes


class _MLP(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.tanh(nn.Dense(16)(x))
    return x


class _CNN(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Conv(8, (3, 3), use_bias=False)(x))
    return x


def _step_ops(model, x, tx, statistics):
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  if statistics is None:
    grad_fn = jax.value_and_grad(loss)
  else:
    grad_fn = eva_optax.value_and_grad(loss, statistics=statistics)

  def step(params, state):
    out = grad_fn(params)
    extra = {} if statistics is None else {"stats": out[2]}
    updates, state = tx.update(out[1], state, params, **extra)
    return optax.apply_updates(params, updates), state

  return count_ops(jax.jit(step).lower(params, tx.init(params)).compile())


def _per_layer(model_cls, x, tx, statistics, shallow=4, deep=12):
  small = _step_ops(model_cls(shallow), x, tx, statistics)
  large = _step_ops(model_cls(deep), x, tx, statistics)
  return (sum(large.values()) - sum(small.values())) / (deep - shallow), small, large


# Measured with jax 0.10.2 on the CPU backend: SGD 9 (Dense) and 10 (Conv) ops per
# layer; Eva and Eva-f 14-16.5, i.e. 4-6.5 more per layer (they were 18-28 before the
# grouped rules and the convolution-free conv ā). The bounds leave a little room for
# XLA's fusion decisions to move.
@pytest.mark.parametrize(
  "model_cls, x, bound",
  [(_MLP, jnp.ones((8, 16)), 6.5), (_CNN, jnp.ones((4, 8, 8, 8)), 7.5)],
  ids=["dense", "conv"],
)
@pytest.mark.parametrize(
  "make, statistics",
  [(eva_optax.eva, eva_optax.EVA_STATISTICS), (eva_optax.eva_foof, eva_optax.EVA_FOOF_STATISTICS)],
  ids=["eva", "eva_foof"],
)
def test_extra_operations_per_layer_stay_few(model_cls, x, bound, make, statistics):
  sgd, sgd_small, sgd_large = _per_layer(model_cls, x, optax.sgd(0.1, momentum=0.9), None)
  eva, eva_small, eva_large = _per_layer(model_cls, x, make(0.1), statistics)
  assert 0 < eva - sgd <= bound, (sgd, eva, dict(eva_large))
  # No convolution of its own: the conv ā is one matrix product per layer.
  assert eva_large["convolution"] == sgd_large["convolution"]
  assert eva_small["convolution"] == sgd_small["convolution"]


def test_count_ops_reads_the_entry_computation():
  f = jax.jit(lambda a, b: (jnp.tanh(a @ b), jnp.sum(a)))
  text = f.lower(jnp.ones((4, 4)), jnp.ones((4, 4))).compile().as_text()
  ops = count_ops(text)
  assert sum(ops.values()) >= 2  # the product and the sum at least
  assert "parameter" not in ops and "tuple" not in ops
  assert "parameter" in entry_opcodes(text)
  with pytest.raises(ValueError, match="ENTRY"):
    entry_opcodes("HloModule empty")
