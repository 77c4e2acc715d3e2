"""The shardings of an optimizer state, from the parameters' shardings.

``jax.jit`` needs the optimizer state's shardings as well as the parameters'
(``in_shardings``/``out_shardings``); :func:`state_shardings` gives them for
any optimizer, eva_optax's or optax's, alone or chained:

* a tree shaped like the parameters (momentum, Adam's moments) takes the
  parameters' shardings (``optax.tree_map_params``);
* the state of a layer-wise preconditioner (Eva, Eva-f, K-FAC, FOOF) follows
  each layer's kernel: ā like its input axes, ḡ like its output axes
  (:func:`eva_optax._src.sharding.statistic_spec`);
* Shampoo's statistics and roots have their rows split over the devices
  (:func:`eva_optax._src.shampoo.shampoo_state_specs`);
* everything else (counts, scalars, Eva-s's per-dimension vectors) is
  replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from eva_optax._src.layerwise_specs import is_layerwise_state, layerwise_state_specs
from eva_optax._src.shampoo import ScaleByShampooState, shampoo_state_specs
from eva_optax._src.sharding import params_mesh


#: ``state_shardings(..., matrices=)``: K-FAC's, FOOF's and Shampoo's matrices
#: split over the devices, or whole on every one.
_SPLIT, _WHOLE = "split", "whole"


def state_shardings(tx: Any, params: Any, shardings: Any = None, *, matrices: str = _SPLIT) -> Any:
  """The ``NamedSharding`` of every leaf of ``tx.init(params)``.

  Args:
    tx: an optax ``GradientTransformation`` (or anything with ``init``).
    params: the parameters, or their ``jax.ShapeDtypeStruct``\\ s; placed with
      ``NamedSharding``\\ s unless ``shardings`` is given.
    shardings: the parameters' ``NamedSharding``\\ s (a tree like ``params``),
      for example ``nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed),
      mesh, rules)``.
    matrices: where K-FAC's and FOOF's factors and inverses and Shampoo's
      statistics and roots live. ``'split'`` (default): their rows over the
      devices, the state over all devices about its logical size; every step
      gathers the inverses (roots) whole once, in one all-gather of all of
      them. ``'whole'``: whole on every device (as many copies as devices),
      and no collective for them between refreshes. Either way each inverse
      is computed on one device.

  Returns:
    A tree like the state with a ``NamedSharding`` per leaf, for
    ``jax.jit(..., in_shardings=..., out_shardings=...)`` or
    ``jax.jit(tx.init, out_shardings=...)``.

  Example::

      state_sharding = eva_optax.state_shardings(tx, params, param_sharding)
      opt_state = jax.jit(tx.init, out_shardings=state_sharding)(params)
  """
  if matrices not in (_SPLIT, _WHOLE):
    raise ValueError(f"state_shardings: matrices={matrices!r}, expected {_SPLIT!r} or {_WHOLE!r}")
  split = matrices == _SPLIT
  if shardings is not None:
    params = jax.tree.map(
      lambda p, s: jax.ShapeDtypeStruct(jax.numpy.shape(p), jax.numpy.result_type(p), sharding=s),
      params,
      shardings,
    )
  mesh = params_mesh(params)
  if mesh is None:
    raise ValueError(
      "state_shardings needs the parameters' shardings: pass params placed with"
      " NamedShardings, or shardings= (a tree of NamedSharding like params)"
    )
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = jax.eval_shape(tx.init, params)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  marked = optax.tree_map_params(
    tx,
    lambda s, p: s if masked(s) else p.sharding,
    abstract,
    params,
    transform_non_params=lambda v: v,
    is_leaf=masked,  # optax.masked leaves a MaskedNode where a parameter is left out
  )

  own_specs = lambda x: is_layerwise_state(x) or isinstance(x, ScaleByShampooState)

  def sharding_of(node: Any) -> Any:
    if own_specs(node):
      specs = (
        layerwise_state_specs(node, params, split)
        if is_layerwise_state(node)
        else shampoo_state_specs(node, params, split)
      )
      return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
      )
    if isinstance(node, NamedSharding):
      return node
    return replicated

  return jax.tree.map(
    sharding_of, marked, is_leaf=lambda x: own_specs(x) or isinstance(x, NamedSharding)
  )
