"""Module paths (``eva_optax._src.paths``): the names that match parameters to statistics."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_optax._src import paths


def test_flatten_with_paths_then_nest_is_the_tree():
  tree = {
    "Dense_0": {"kernel": np.ones((3, 2)), "bias": np.zeros(2)},
    "blocks": {"0": {"attn": {"query": {"kernel": np.full((2, 2), 3.0)}}}},
    "scale": np.float32(0.5),
  }
  flat = paths.flatten_with_paths(tree)
  assert [p for p, _ in flat] == [
    ("Dense_0", "bias"),
    ("Dense_0", "kernel"),
    ("blocks", "0", "attn", "query", "kernel"),
    ("scale",),
  ]
  back = paths.nest(dict(flat))
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_nest_of_the_empty_path_is_the_leaf():
  leaf = np.arange(3)
  assert paths.nest({(): leaf}) is leaf
  assert paths.nest({("a", "b"): 1, ("a", "c"): 2, ("d",): 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


def test_path_of_names_every_key_kind():
  keys = (
    jax.tree_util.DictKey("blocks"),
    jax.tree_util.SequenceKey(2),
    jax.tree_util.GetAttrKey("attn"),
  )
  assert paths.path_of(keys) == ("blocks", "2", "attn")
  assert paths.path_str(("blocks", "2", "attn")) == "blocks/2/attn"


def test_path_of_drops_the_value_of_nnx_variables():
  """An ``nnx.State`` of ``Param`` variables has the paths of the plain arrays."""
  value = jax.tree_util.GetAttrKey("value")
  assert paths.path_of((jax.tree_util.DictKey("linear"), value)) == ("linear",)
  assert paths.path_of((jax.tree_util.GetAttrKey("other"),)) == ("other",)  # only .value is dropped

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  raw = [tuple(keys) for keys, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert any(value in keys for keys in raw), raw  # the key really is there to drop
  flat = dict(paths.flatten_with_paths(state))
  assert set(flat) == {("kernel",), ("bias",)}
  np.testing.assert_array_equal(flat[("kernel",)], model.kernel[...])
  assert jnp.shape(flat[("bias",)]) == (2,)
