"""Module paths in parameter and statistics trees.

A layer is named by its module path, the tuple of keys leading to it in the
parameter tree (``('Dense_0',)``, ``('blocks', '0', 'attn', 'query')``). The
parameters and the statistics of a layer share that path, so the optimizers
match the two trees by it.
"""

from __future__ import annotations

from typing import Any

import jax

Path = tuple[str, ...]

KERNEL = "kernel"
BIAS = "bias"


def _key_name(key: Any) -> str:
  """The readable name of one ``jax.tree_util`` path key."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_of(keys: tuple[Any, ...]) -> Path:
  """Names of the keys; the ``.value`` attribute of a Flax NNX variable is dropped,
  so an ``nnx.State`` of variables has the paths of the plain arrays."""
  return tuple(
    _key_name(k)
    for k in keys
    if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")
  )


def path_str(path: Path) -> str:
  return "/".join(path)


def flatten_with_paths(tree: Any, is_leaf=None) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` for every leaf of ``tree``."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_of(keys), leaf) for keys, leaf in leaves]


def nest(flat: dict[Path, Any]) -> dict[str, Any]:
  """``{('a', 'b'): x}`` → ``{'a': {'b': x}}``."""
  if () in flat:
    return flat[()]
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out
