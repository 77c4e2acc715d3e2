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
  slot = layers.find_layer_slots({"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}})[
    ("Dense_0",)
  ]
  layers.check_stats_match(slot, LayerStats(jnp.zeros(4), jnp.zeros(3)))
  with pytest.raises(ValueError, match="'Dense_0'.*layouts_of"):
    layers.check_stats_match(
      slot, LayerStats(jnp.zeros(4), jnp.zeros(3), layout=KernelLayout(1, 1))
    )
  with pytest.raises(ValueError, match=r"'Dense_0': input_mean of shape \(5,\)"):
    layers.check_stats_match(slot, LayerStats(jnp.zeros(5), jnp.zeros(3)))
  with pytest.raises(ValueError, match="'Dense_0'.*has_bias=False"):
    layers.check_stats_match(slot, LayerStats(jnp.zeros(4), jnp.zeros(3), has_bias=False))


def test_permuted_kernel_and_bias_round_trip_through_the_matrix_view():
  """An Einsum kernel 'NDH' (input D, outputs N and H) is the matrix (D, N·H) of
  the kernel transposed to D, N, H; its bias (entries in the output's order N, H)
  the vector N·H; kernel_from_matrix and bias_from_vector undo both."""
  layout = KernelLayout(0, 2, (1, 0, 2), (0, 2))
  kernel = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
  bias = np.arange(15, dtype=np.float32).reshape(3, 5)
  matrix = layers.kernel_matrix(jnp.asarray(kernel), layout)
  np.testing.assert_array_equal(matrix, kernel.transpose(1, 0, 2).reshape(4, 15))
  np.testing.assert_array_equal(layers.kernel_from_matrix(matrix, layout, kernel.shape), kernel)
  vector = layers.bias_vector(jnp.asarray(bias), layout, kernel.shape)
  np.testing.assert_array_equal(vector, bias.reshape(15))
  np.testing.assert_array_equal(
    layers.bias_from_vector(vector, layout, bias.shape, kernel.shape), bias
  )
  # A bias whose entries run in another order than the kernel's (output 'BTHN'):
  other = KernelLayout(0, 2, (1, 0, 2), (2, 0))
  flipped = np.arange(15, dtype=np.float32).reshape(5, 3)  # entries (H, N)
  np.testing.assert_array_equal(
    layers.bias_vector(jnp.asarray(flipped), other, kernel.shape), flipped.T.reshape(15)
  )
  np.testing.assert_array_equal(
    layers.bias_from_vector(
      layers.bias_vector(jnp.asarray(flipped), other, kernel.shape),
      other,
      flipped.shape,
      kernel.shape,
    ),
    flipped,
  )


def test_grouped_kernel_round_trips_through_the_matrix_view():
  """A grouped conv kernel (kh, kw, in/groups, out) is the stack over groups of
  the matrices (kh·kw·in/groups, out/groups) of its output blocks; its bias (out,)
  the stack of its blocks; kernel_from_matrix undoes the view."""
  layout = KernelLayout(1, 1, groups=2)
  kernel = np.arange(3 * 3 * 2 * 6, dtype=np.float32).reshape(3, 3, 2, 6)
  matrix = layers.kernel_matrix(jnp.asarray(kernel), layout)
  assert matrix.shape == (2, 18, 3) and layout.dims(kernel.shape) == ((2,), 18, 3)
  for g in range(2):
    np.testing.assert_array_equal(matrix[g], kernel[..., 3 * g : 3 * g + 3].reshape(18, 3))
  np.testing.assert_array_equal(layers.kernel_from_matrix(matrix, layout, kernel.shape), kernel)
  bias = np.arange(6, dtype=np.float32)
  np.testing.assert_array_equal(
    layers.bias_vector(jnp.asarray(bias), layout, kernel.shape), bias.reshape(2, 3)
  )
  with pytest.raises(ValueError, match="does not fit"):
    KernelLayout(1, 1, groups=4).check(kernel.shape, "conv")


def test_bias_free_attention_projections_are_guessed_right():
  """Flax's attention without bias: query/key/value kernels (features, heads,
  head_dim) have two output axes, the out projection one; so tx.init(params)
  alone gives the update that the captured layouts give."""
  import flax.linen as nn
  import jax

  import eva_optax

  assert layers.infer_layout((8, 2, 4), None, "query") == KernelLayout(0, 2)
  assert layers.infer_layout((2, 4, 8), None, "out") == KernelLayout(0, 1)
  assert layers.infer_layout((8, 2, 4), None, "dense") == KernelLayout(0, 1)
  attention = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  y = jax.random.normal(jax.random.key(1), (2, 5, 8))
  params = attention.init(jax.random.key(2), x)["params"]
  loss = lambda p: jnp.mean((attention.apply({"params": p}, x) - y) ** 2)
  _, grads, stats = eva_optax.value_and_grad(loss)(params)
  plain, given = eva_optax.eva(0.1), eva_optax.eva(0.1, layouts=eva_optax.layouts_of(stats))
  got, _ = plain.update(grads, plain.init(params), params, stats=stats)
  want, _ = given.update(grads, given.init(params), params, stats=stats)
  for name in ("query", "key", "value", "out"):
    np.testing.assert_array_equal(got[name]["kernel"], want[name]["kernel"])
  assert stats["query"].layout == KernelLayout(0, 2)


def test_possible_layouts_of_kernels_the_parameters_leave_open():
  """The guess first, then the other layouts Flax's layers give such a kernel."""
  assert layers.possible_layouts((4, 3), (3,)) == (KernelLayout(0, 1),)
  assert layers.possible_layouts((4, 3), None) == (KernelLayout(0, 1),)
  # Bias-free rank 3: DenseGeneral with 1 or 2 outputs, a stack of Dense, the
  # two Einsums contracting axis 1 or axis 2.
  assert layers.possible_layouts((4, 3, 5), None, "proj") == (
    KernelLayout(0, 1),
    KernelLayout(0, 2),
    KernelLayout(1, 1),
    KernelLayout(0, 2, permutation=(1, 0, 2)),
    KernelLayout(0, 2, permutation=(2, 0, 1)),
  )
  assert layers.possible_layouts((4, 3, 5), None, "query") == (KernelLayout(0, 2),)
  assert layers.possible_layouts((4, 3, 5), None, "out") == (KernelLayout(0, 1),)
  # With a bias (3, 5): in 4, out 3·5, the only reading of 15 outputs; with a
  # bias (4, 5): the stack of Dense and the Einsum contracting axis 1.
  assert layers.possible_layouts((4, 3, 5), (3, 5)) == (KernelLayout(0, 2),)
  assert layers.possible_layouts((4, 3, 5), (4, 5)) == (
    KernelLayout(1, 1),
    KernelLayout(0, 2, permutation=(1, 0, 2)),
  )
  # A conv kernel with one input channel per group: every group count (and
  # the DenseGeneral reading with outputs (1, 4), the same matrix).
  assert layers.possible_layouts((3, 3, 1, 4), (4,)) == (
    KernelLayout(0, 1),
    KernelLayout(1, 1, groups=2),
    KernelLayout(1, 1, groups=4),
    KernelLayout(0, 2),
  )
  assert layers.possible_layouts((3, 3, 2, 4), (4,)) == (KernelLayout(0, 1),)
  # Bias-free rank 4: a Conv (however small), or depthwise; Flax's attention
  # under nn.scan (query: stack, in, two outputs; out: a Conv or stack, in 2·… out).
  assert layers.possible_layouts((3, 3, 2, 4), None) == (KernelLayout(0, 1),)
  assert layers.possible_layouts((3, 3, 1, 2), None) == (
    KernelLayout(0, 1),
    KernelLayout(1, 1, groups=2),
  )
  assert layers.possible_layouts((2, 8, 2, 4), None, "query") == (KernelLayout(1, 2),)
  assert layers.possible_layouts((2, 2, 4, 8), None, "out") == (
    KernelLayout(0, 1),
    KernelLayout(1, 1),
  )
  # A module named like an Einsum: any one axis contracted, the rest outputs.
  assert layers.possible_layouts((2, 3, 4, 5), None, "kv_einsum") == (
    KernelLayout(0, 1),
    KernelLayout(0, 3, permutation=(1, 0, 2, 3)),
    KernelLayout(0, 3, permutation=(2, 0, 1, 3)),
    KernelLayout(0, 3, permutation=(3, 0, 1, 2)),
    KernelLayout(0, 3),
  )


def test_reserved_layouts_keep_the_guess_the_depthwise_and_what_is_at_most_8x():
  sizes = {
    KernelLayout(0, 1): 10,
    KernelLayout(0, 2): 80,
    KernelLayout(1, 1): 81,
    KernelLayout(1, 1, groups=9): 1000,
  }
  kept = layers.reserved_layouts((3, 3, 1, 9), tuple(sizes), sizes.__getitem__)
  assert kept == (KernelLayout(0, 1), KernelLayout(0, 2), KernelLayout(1, 1, groups=9))
  assert layers.reserved_layouts((3, 3, 1, 9), (), sizes.__getitem__) == ()


def test_layers_read_names_only_through_the_naming_convention():
  # Without a convention every kernel is read by its shape alone: layers.py knows no
  # framework's module names (Flax's are in flax_layouts, set when eva_optax is imported).
  from eva_optax._src import flax_layouts

  cases = [
    ((8, 2, 4), "query"),
    ((2, 2, 4, 8), "key"),
    ((2, 4, 8), "out"),
    ((1, 2, 4, 8), "out"),
    ((2, 3, 4, 5), "kv_einsum"),
  ]
  with_flax = {c: layers.possible_layouts(c[0], None, c[1]) for c in cases}
  previous = layers.set_naming_convention(None)
  try:
    assert previous is flax_layouts.flax_names
    for shape, name in cases:
      assert layers.possible_layouts(shape, None, name) == layers.possible_layouts(
        shape, None, "Dense_0"
      )
      assert layers.infer_layout(shape, None, name) == KernelLayout(0, 1)
  finally:
    layers.set_naming_convention(previous)
  # ...and with Flax's, the names change what is read.
  assert with_flax[(8, 2, 4), "query"] == (KernelLayout(0, 2),)
  assert with_flax[(2, 2, 4, 8), "key"] == (KernelLayout(1, 2),)
  assert KernelLayout(1, 1) in with_flax[(1, 2, 4, 8), "out"]
  assert len(with_flax[(2, 3, 4, 5), "kv_einsum"]) > len(
    layers.possible_layouts((2, 3, 4, 5), None, "x")
  )
  assert with_flax[(2, 4, 8), "out"] == (KernelLayout(0, 1),)
