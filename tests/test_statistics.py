"""What the statistics are (``eva_optax._src.statistics``): names, shapes, containers.

A layer with kernel matrix (in, out): ā (in,), ḡ (out,), A (in[+1], in[+1])
with the bias's trailing 1, G (out, out); each with the stack axes in front.
"""

import numpy as np
import pytest

from eva_optax._src import statistics
from eva_optax._src.statistics import KernelLayout, LayerStats, PassThrough


@pytest.mark.parametrize(
  "stack, has_bias, n_in",
  [((), True, 5), ((), False, 4), ((3,), True, 5), ((2, 3), False, 4)],
)
def test_statistic_shapes_with_and_without_bias(stack, has_bias, n_in):
  """in = 4, out = 3: the bias adds the trailing 1 of â to A only."""
  assert statistics.statistic_shapes(stack, 4, 3, has_bias) == {
    "input_mean": stack + (4,),
    "output_grad_mean": stack + (3,),
    "input_factor": stack + (n_in, n_in),
    "output_grad_factor": stack + (3, 3),
  }


def test_the_statistics_are_named_once():
  assert statistics.STATISTICS == (
    "input_mean",
    "output_grad_mean",
    "input_factor",
    "output_grad_factor",
  )
  assert set(statistics.EVA_STATISTICS) | set(statistics.FACTORS) == set(statistics.STATISTICS)
  assert set(statistics.STATISTICS) <= {f.name for f in LayerStats.__dataclass_fields__.values()}


def test_requested_gives_a_checked_tuple():
  assert statistics.requested(["input_factor", "input_mean"]) == ("input_factor", "input_mean")
  assert statistics.requested(statistics.STATISTICS) == statistics.STATISTICS


@pytest.mark.parametrize(
  "names", [(), ("hessian",), ("input_mean", "input_covariance"), ("output_grad_factors",)]
)
def test_requested_refuses_unknown_names_and_nothing(names):
  with pytest.raises(ValueError, match="statistics must be a non-empty subset"):
    statistics.requested(names)


@pytest.mark.parametrize(
  "layout, shape, dims",
  [
    (KernelLayout(), (4, 3), ((), 4, 3)),  # Dense
    (KernelLayout(), (3, 3, 2, 8), ((), 18, 8)),  # Conv, HWIO
    (KernelLayout(0, 2), (5, 2, 3), ((), 5, 6)),  # DenseGeneral, two output axes
    (KernelLayout(1, 1), (6, 4, 3), ((6,), 4, 3)),  # stacked by nn.scan
    (KernelLayout(2, 2), (2, 3, 4, 5, 6, 7), ((2, 3), 20, 42)),
  ],
)
def test_kernel_layout_dims(layout, shape, dims):
  assert layout.dims(shape) == dims
  layout.check(shape, "layer")


@pytest.mark.parametrize(
  "layout, shape",
  [(KernelLayout(1, 1), (4, 3)), (KernelLayout(0, 2), (4, 3)), (KernelLayout(0, 0), (4, 3))],
)
def test_kernel_layout_check_needs_an_input_and_an_output_axis(layout, shape):
  with pytest.raises(ValueError, match="Dense_0: layout .* does not fit a kernel of shape"):
    layout.check(shape, "Dense_0")


def test_layer_entries_and_layouts_of():
  """Entries by module path, LayerStats and PassThrough alike; layouts only of the LayerStats."""
  dense = LayerStats(np.zeros(4), np.zeros(3))
  stacked = LayerStats(
    np.zeros((2, 5)), np.zeros((2, 5)), layout=KernelLayout(1, 1), has_bias=False
  )
  skipped = PassThrough("ConvTranspose", "not a Dense, DenseGeneral or Conv")
  stats = {"Dense_0": dense, "blocks": {"mlp": stacked}, "up": skipped}
  entries = statistics.layer_entries(stats)
  want = {("Dense_0",): dense, ("blocks", "mlp"): stacked, ("up",): skipped}
  assert set(entries) == set(want)
  assert all(entries[path] is entry for path, entry in want.items())
  assert statistics.layouts_of(stats) == {
    "Dense_0": KernelLayout(0, 1),
    "blocks": {"mlp": KernelLayout(1, 1)},
  }
