"""The capture's framework-neutral core (``eva_optax._src.capture``) against NumPy.

The statistics of one layer call from its input and its output gradient: ā
(dense: the mean row in the kernel's input order; conv: the batch mean, then the
mean of its im2col patches in HWIO order), A = mean â âᵀ, G = N · Σ_rows dy dyᵀ;
and the bookkeeping around them: layer records, padding and strides per axis,
the factors' gate, the average over calls. Both front-ends are checked whole in
test_linen_capture.py and test_nnx_capture.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from eva_optax._src import capture
from eva_optax._src.capture import call_statistics, probes, taps
from eva_optax._src.capture import ConvGeometry, DenseGeometry
from eva_optax._src.statistics import KernelLayout, STATISTICS


# ---------------------------------------------------------------------------
# ā of a convolution.


@pytest.mark.parametrize(
  "padding, strides, dilation",
  [("SAME", 1, 1), ("VALID", 2, 1), ("SAME", 2, 2), ([(2, 1), (0, 3)], (1, 2), 1), (1, 1, 1)],
)
def test_conv_input_mean_without_convolution_equals_im2col(padding, strides, dilation):
  """ā of a zero-padded Conv (one product with a selection matrix) is the mean
  of the im2col patches of the mean image, from an independent extraction."""
  conv = nn.Conv(
    3, (3, 2), strides=strides, padding=padding, kernel_dilation=dilation, use_bias=False
  )
  x = jax.random.normal(jax.random.key(0), (5, 9, 8, 2))
  params = conv.init(jax.random.key(1), x)["params"]
  loss = lambda p: jnp.mean(conv.apply({"params": p}, x) ** 2)
  _, _, stats = eva_optax.value_and_grad(loss)(params)
  mean_image = np.asarray(x).mean(0, keepdims=True)
  patches = jax.lax.conv_general_dilated_patches(
    jnp.asarray(mean_image),
    (3, 2),
    conv.strides if isinstance(strides, tuple) else (strides,) * 2,
    padding if isinstance(padding, (str, list)) else [(padding, padding)] * 2,
    rhs_dilation=(dilation, dilation),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )  # (1, Ho, Wo, C·kh·kw), features ordered (c, kh, kw)
  mean = np.asarray(patches).reshape(-1, 2, 3, 2).mean(0)  # (c, kh, kw)
  want = np.transpose(mean, (1, 2, 0)).reshape(-1)  # HWIO order (kh, kw, c)
  np.testing.assert_allclose(stats.input_mean, want, rtol=1e-5, atol=1e-6)


def _patch_mean(images, kernel_size, strides):
  """Mean over images and VALID positions of the im2col patches, HWIO order, by loops."""
  out = [(s - k) // st + 1 for s, k, st in zip(images.shape[1:-1], kernel_size, strides)]
  total = np.zeros(tuple(kernel_size) + images.shape[-1:])
  for o in np.ndindex(*out):
    at = tuple(slice(i * st, i * st + k) for i, st, k in zip(o, strides, kernel_size))
    total += images[(slice(None),) + at].mean(0)
  return (total / np.prod(out)).reshape(-1)


@pytest.mark.parametrize("padding, mode", [("CIRCULAR", "wrap"), ("REFLECT", "reflect")])
def test_conv_input_mean_of_wrapped_and_mirrored_padding(padding, mode):
  """No selection matrix there: ā by the convolution's gradient equals the patch
  mean of the image padded by hand ((k−1)//2 low, k//2 high)."""
  geometry = ConvGeometry((3, 2), (1, 2), padding, (1, 1), (1, 1))
  x = np.random.default_rng(0).normal(size=(4, 5, 6, 2))
  assert call_statistics.patch_selection(geometry, (5, 6)) is None
  got = call_statistics.input_mean(geometry, jnp.asarray(x, jnp.float32))
  padded = np.pad(x.mean(0, keepdims=True), [(0, 0), (1, 1), (0, 1), (0, 0)], mode=mode)
  np.testing.assert_allclose(got, _patch_mean(padded, (3, 2), (1, 2)), rtol=1e-5, atol=1e-6)


def test_patch_selection_only_for_zero_padding_without_input_dilation():
  same = ConvGeometry((3, 3), (1, 1), "SAME", (1, 1), (1, 1))
  assert call_statistics.patch_selection(same, (4, 4)).shape == (9, 16)
  assert call_statistics.patch_selection(same._replace(input_dilation=(2, 1)), (4, 4)) is None
  assert call_statistics.patch_selection(same._replace(padding="REFLECT"), (4, 4)) is None
  # Each window offset of a VALID 1-d conv reads each output position's pixel once.
  valid = ConvGeometry((2,), (1,), "VALID", (1,), (1,))
  np.testing.assert_allclose(
    call_statistics.patch_selection(valid, (4,)), [[1, 1, 1, 0], [0, 1, 1, 1]] / np.float32(3)
  )


# ---------------------------------------------------------------------------
# Dense rows and the factors.


def test_dense_rows_follow_the_kernels_input_order():
  """DenseGeometry(axis=(-1, -2)): rows over the other axes, features in ascending axis order."""
  x = np.random.default_rng(1).normal(size=(2, 3, 4, 5))
  geometry = DenseGeometry(axis=(-1, -2))
  rows = np.asarray(call_statistics.input_rows(geometry, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(rows, x.reshape(6, 20), rtol=1e-6)
  np.testing.assert_allclose(
    call_statistics.input_mean(geometry, jnp.asarray(x, jnp.float32)),
    x.reshape(6, 20).mean(0),
    rtol=1e-5,
  )
  middle = DenseGeometry(axis=(1,))
  rows = np.asarray(call_statistics.input_rows(middle, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(rows, np.moveaxis(x, 1, -1).reshape(-1, 3), rtol=1e-6)


@pytest.mark.parametrize("has_bias", [False, True])
def test_factors_equal_their_formulas(has_bias):
  """A = mean over rows of â âᵀ (â = [row, 1] with a bias); G = N · Σ_rows dy dyᵀ."""
  rng = np.random.default_rng(2)
  x, dy = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 2))  # N = 4 samples of 3 positions
  layer = capture.layer_record("Dense", DenseGeometry(), (5, 2), 2, 1, has_bias)
  rows = x.reshape(-1, 5)
  hat = np.concatenate([rows, np.ones((12, 1))], 1) if has_bias else rows
  np.testing.assert_allclose(
    call_statistics.input_factor(layer, jnp.asarray(x, jnp.float32)),
    hat.T @ hat / 12,
    rtol=1e-5,
    atol=1e-6,
  )
  assert call_statistics.batch_size(layer.geometry, x) == 4
  g = call_statistics.output_grad_factor(jnp.asarray(dy, jnp.float32), 2, 4)
  np.testing.assert_allclose(g, 4 * dy.reshape(-1, 2).T @ dy.reshape(-1, 2), rtol=1e-5)


def test_batch_size_counts_the_samples():
  conv = ConvGeometry((3, 3), (1, 1), "SAME", (1, 1), (1, 1))
  assert call_statistics.batch_size(conv, np.zeros((2, 3, 7, 6, 3))) == 6  # two batch axes
  assert call_statistics.batch_size(conv, np.zeros((7, 6, 3))) == 1
  assert call_statistics.batch_size(DenseGeometry(), np.zeros((5, 9, 3))) == 5
  assert call_statistics.batch_size(DenseGeometry(), np.zeros((3,))) == 1


# ---------------------------------------------------------------------------
# Records, arguments, the gate, the average over calls.


def test_layer_record_of_a_stacked_conv():
  layer = capture.layer_record(
    "Conv", ConvGeometry((3, 3), (1, 1), "SAME", (1, 1), (1, 1)), (5, 3, 3, 2, 4), 4, 1, True
  )
  assert layer.layout == KernelLayout(1, 1)
  assert (layer.stack_shape, layer.in_dim, layer.out_dim) == ((5,), 18, 4)
  probes = capture.zero_probes(layer, STATISTICS, None)
  assert {k: v.shape for k, v in probes[capture.INPUT_PROBE].items()} == {
    "calls": (5,),
    "input_mean": (5, 18),
    "input_factor": (5, 19, 19),
  }
  assert probes[taps.OUTPUT_PROBE].shape == (5, 4)
  assert probes[taps.OUTPUT_FACTOR_PROBE].shape == (5, 4, 4)


def test_padding_and_strides_per_axis():
  assert capture.canonical_padding("SAME", 2) == "SAME"
  assert capture.canonical_padding(1, 2) == ((1, 1), (1, 1))
  assert capture.canonical_padding([2, (0, 3)], 2) == ((2, 2), (0, 3))
  with pytest.raises(ValueError, match="invalid convolution padding"):
    capture.canonical_padding([(1, 1)], 2)
  assert capture.per_axis(None, 3) == (1, 1, 1)
  assert capture.per_axis(2, 2) == (2, 2)
  assert capture.per_axis((1, 3), 2) == (1, 3)


def test_factors_gate():
  assert capture.factors_gate(True, STATISTICS) is None  # always computed: no gate
  for due, want in ((False, False), (jnp.asarray(True), True), (jnp.int32(0), False)):
    gate = capture.factors_gate(due, STATISTICS)
    assert gate.dtype == jnp.bool_ and gate.shape == () and bool(gate) == want
  with pytest.raises(ValueError, match="none was asked for"):
    capture.factors_gate(False, eva_optax.EVA_STATISTICS)
  for bad in (jnp.ones(3, bool), 0.5):
    with pytest.raises(ValueError, match="scalar bool"):
      capture.factors_gate(bad, STATISTICS)


def test_layer_stats_average_over_the_calls():
  layer = capture.layer_record("Dense", DenseGeometry(), (3, 2), 2, 1, False)
  grads = {
    capture.INPUT_PROBE: {"calls": jnp.float32(2.0), "input_mean": jnp.asarray([2.0, 4.0, 6.0])},
    taps.OUTPUT_PROBE: jnp.asarray([1.0, -3.0]),
  }
  stats = probes.layer_stats(layer, grads)
  np.testing.assert_allclose(stats.input_mean, [1.0, 2.0, 3.0])
  np.testing.assert_allclose(stats.output_grad_mean, [0.5, -1.5])
  assert stats.input_factor is None and stats.output_grad_factor is None
  assert (stats.kind, stats.layout, stats.has_bias) == ("Dense", KernelLayout(0, 1), False)


def test_loss_and_aux():
  assert capture.loss_and_aux(3.0, False) == (3.0, None)
  assert capture.loss_and_aux((3.0, {"y": 1}), True) == (3.0, {"y": 1})
  with pytest.raises(TypeError, match="has_aux"):
    capture.loss_and_aux(3.0, True)
