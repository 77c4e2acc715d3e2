"""The layers of a parameter tree and their kernels as matrices (``eva_optax._src.layers``).

A kernel of layout ``stack + inputs + outputs`` is the matrix ``stack + (in, out)``
(a free reshape); its bias, ``stack + outputs``, the vector ``stack + (out,)``.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax._src import layers
from eva_optax._src.statistics import KernelLayout, LayerStats


@pytest.mark.parametrize(
    "kernel_shape, bias_shape, layout",
    [
        ((7,), (7,), None),  # rank < 2: not a layer
        ((), None, None),
        ((4, 3), None, KernelLayout(0, 1)),  # Dense without bias
        ((4, 3), (3,), KernelLayout(0, 1)),  # Dense
        ((3, 3, 2, 8), (8,), KernelLayout(0, 1)),  # Conv
        ((3, 3, 2, 8), None, KernelLayout(0, 1)),
        ((5, 2, 3), (2, 3), KernelLayout(0, 2)),  # DenseGeneral, two output axes
        ((6, 4, 3), (6, 3), KernelLayout(1, 1)),  # a stack of 6 Dense layers
        ((2, 3, 4, 5, 6), (2, 3, 6), KernelLayout(2, 1)),  # stacked twice
        ((3, 3, 3), (3, 3), KernelLayout(0, 2)),  # two splits fit: the smallest stack
        ((4, 3), (5,), KernelLayout(0, 1)),  # no split fits the bias: the default
    ],
)
def test_infer_layout(kernel_shape, bias_shape, layout):
  assert layers.infer_layout(kernel_shape, bias_shape) == layout


@pytest.mark.parametrize(
    "shape, layout, matrix",
    [
        ((4, 3), KernelLayout(0, 1), (4, 3)),
        ((3, 3, 2, 8), KernelLayout(0, 1), (18, 8)),
        ((5, 2, 3), KernelLayout(0, 2), (5, 6)),
        ((2, 3, 3, 4, 5), KernelLayout(1, 1), (2, 36, 5)),
    ],
)
def test_kernel_matrix_is_the_row_major_reshape(shape, layout, matrix):
  kernel = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  got = layers.kernel_matrix(jnp.asarray(kernel), layout)
  assert got.shape == matrix
  np.testing.assert_array_equal(got, kernel.reshape(matrix))


def test_bias_vector_keeps_the_stack_and_flattens_the_outputs():
  bias = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
  got = layers.bias_vector(jnp.asarray(bias), KernelLayout(1, 2))
  assert got.shape == (2, 6)
  np.testing.assert_array_equal(got, bias.reshape(2, 6))


def test_find_layer_slots():
  """Every module owning a kernel of rank ≥ 2; layouts given by path win over the guess."""
  params = {
      "Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
      "LayerNorm_0": {"scale": jnp.zeros(3), "bias": jnp.zeros(3)},
      "blocks": {"up": {"kernel": jnp.zeros((2, 3, 5))}},  # a stack, no bias: not guessable
      "Embed_0": {"embedding": jnp.zeros((10, 3))},
      "vector": {"kernel": jnp.zeros(3)},
  }
  slots = layers.find_layer_slots(params, layouts={"blocks": {"up": KernelLayout(1, 1)}})
  assert set(slots) == {("Dense_0",), ("blocks", "up")}
  assert slots[("Dense_0",)][:4] == (("Dense_0",), KernelLayout(0, 1), (4, 3), True)
  assert slots[("blocks", "up")][:4] == (("blocks", "up"), KernelLayout(1, 1), (2, 3, 5), False)
  guessed = layers.find_layer_slots(params)
  assert guessed[("blocks", "up")].layout == KernelLayout(0, 1)  # the guess: one (6, 5) matrix


def test_check_stats_match_names_the_layer():
  slot = layers.find_layer_slots({"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}})[("Dense_0",)]
  layers.check_stats_match(slot, LayerStats(jnp.zeros(4), jnp.zeros(3)))
  with pytest.raises(ValueError, match="'Dense_0'.*layouts_of"):
    layers.check_stats_match(slot, LayerStats(jnp.zeros(4), jnp.zeros(3), layout=KernelLayout(1, 1)))
  with pytest.raises(ValueError, match=r"'Dense_0': input_mean of shape \(5,\)"):
    layers.check_stats_match(slot, LayerStats(jnp.zeros(5), jnp.zeros(3)))
  with pytest.raises(ValueError, match="'Dense_0'.*has_bias=False"):
    layers.check_stats_match(slot, LayerStats(jnp.zeros(4), jnp.zeros(3), has_bias=False))
