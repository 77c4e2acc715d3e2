"""Per-layer sums in one operation (``eva_optax._src.segments``) against per-layer sums."""

import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax._src.segments import Segments, sums_in_one_pass


def test_segments_dots_equal_per_layer_dots():
  rng = np.random.default_rng(0)
  stacks = [(), (3,), (2, 2), ()]
  segments = Segments(stacks)
  xs = [rng.normal(size=s + (n,)).astype(np.float32) for s, n in zip(stacks, (5, 4, 3, 7))]
  ys = [rng.normal(size=x.shape).astype(np.float32) for x in xs]
  same, cross, partial = segments.dots(
    [(jnp.asarray(x), jnp.asarray(x)) for x in xs],
    [(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(xs, ys)],
    [None, (jnp.asarray(xs[1]), jnp.asarray(ys[1])), None, None],
  )
  assert same.shape == cross.shape == (segments.size,) == (1 + 3 + 4 + 1,)
  for l, (x, y) in enumerate(zip(xs, ys)):
    np.testing.assert_allclose(segments.of(same, l), np.sum(x * x, -1), rtol=1e-5)
    np.testing.assert_allclose(segments.of(cross, l), np.sum(x * y, -1), rtol=1e-5)
  np.testing.assert_allclose(segments.of(partial, 1), np.sum(xs[1] * ys[1], -1), rtol=1e-5)
  for l in (0, 2, 3):
    np.testing.assert_array_equal(segments.of(partial, l), 0.0)
  with pytest.raises(ValueError, match="group 0 has 1 entries for 4 layers"):
    segments.dots([(jnp.ones(2), jnp.ones(2))])


def test_pack_indicator_and_of_address_each_layers_slots():
  segments = Segments([(2,), (), (2, 3)])
  assert len(segments) == 3 and segments.size == 2 + 1 + 6
  np.testing.assert_array_equal(segments.offsets, [0, 2, 3, 9])
  per_layer = [jnp.asarray([1.0, 2.0]), jnp.asarray(3.0), jnp.arange(6.0).reshape(2, 3) + 4]
  packed = segments.pack(per_layer)
  np.testing.assert_array_equal(packed, np.arange(1.0, 10.0))
  for l, v in enumerate(per_layer):
    np.testing.assert_array_equal(segments.of(packed, l), v)
  np.testing.assert_array_equal(
    segments.indicator([True, False, True]), [1, 1, 0, 1, 1, 1, 1, 1, 1]
  )


def test_dots_of_no_pairs_are_zeros():
  segments = Segments([(), (2,)])
  (dots,) = segments.dots([None, None])
  np.testing.assert_array_equal(dots, np.zeros(3))


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 2), (0, 1, 2)])
def test_two_sums_equal_the_two_sums(axes):
  rng = np.random.default_rng(3)
  first, second = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
  a, b = sums_in_one_pass(jnp.asarray(first, jnp.float32), jnp.asarray(second, jnp.float32), axes)
  np.testing.assert_allclose(a, first.sum(axes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b, second.sum(axes), rtol=1e-5, atol=1e-5)
