"""Which parameters the layer-wise optimizers precondition, as labels for ``optax.partition``.

Eva, Eva-f, K-FAC and FOOF precondition the kernel and bias of every Dense,
DenseGeneral, Conv and Einsum layer they find (:func:`~eva_optax._src.layers.find_layer_slots`:
a module owning a ``kernel`` of rank ≥ 2, and its ``bias``) and for which the capture
gave statistics; every other parameter (embeddings, norm scales and offsets, layers the
capture passed through) is returned unchanged, as in the authors' code, whose
preconditioners hook ``Linear`` and ``Conv2d`` modules only (``_register_module_hooks``
in ``kfac/eva.py`` of lzhangbv/eva; Zhang, Shi, Li, ICLR 2023). :func:`layer_labels`
names the two sets, so that the parameters outside a layer can get another optimizer.
"""

from __future__ import annotations

from typing import Any

import jax

from eva_optax._src.layers import find_layer_slots
from eva_optax._src.paths import BIAS, KERNEL, path_of
from eva_optax._src.statistics import LayerStats, layer_entries

#: The label of a kernel or bias a layer-wise optimizer preconditions.
LAYER = "layer"
#: The label of every other parameter, which it returns unchanged.
OUTSIDE = "outside"


def layer_labels(params: Any, stats: Any = None) -> Any:
  """``'layer'`` or ``'outside'`` for every leaf of ``params``: a tree shaped like it.

  ``'layer'``: the ``kernel`` (rank ≥ 2) and the ``bias`` of a module, the parameters
  :func:`eva_optax.eva`, :func:`eva_optax.eva_foof`, :func:`eva_optax.kfac` and
  :func:`eva_optax.foof` precondition (found the way they find them,
  ``find_layer_slots``). ``'outside'``: every other parameter (embeddings, norm scales
  and offsets, a module's other leaves), which they return unchanged. With ``stats``,
  a module is a layer only where the capture gave it :class:`~eva_optax.LayerStats`:
  a module it passed through (:class:`~eva_optax.PassThrough`, e.g. an LSTM cell's
  kernels, a ``ConvTranspose``) or never saw is ``'outside'``, as
  :func:`eva_optax.describe` reports it.

  Used as the labels of ``optax.partition`` (a function of the parameters), it gives
  the layers to a layer-wise optimizer and the rest to another::

      tx = optax.partition(
          {"layer": eva_optax.eva(0.01), "outside": optax.adamw(1e-3)},  # SGD's 0.1 / 10
          eva_optax.layer_labels,
      )
      loss, grads, stats = eva_optax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)

  The layers then move exactly as under Eva alone (whose KL clip sums over its
  layers only), the other parameters as under AdamW. With the capture's statistics,
  ``functools.partial(eva_optax.layer_labels, stats=abstract_stats)`` (the stats of
  ``jax.eval_shape(grad_fn, params, batch)``).

  Args:
    params: a parameter tree (a Linen ``params`` dict, an NNX ``nnx.State``), or the
      update tree ``optax.partition`` passes; leaves may be traced or abstract.
    stats: the capture's statistics for these parameters (``None``: every module
      owning a kernel of rank ≥ 2 is a layer).

  Returns:
    A tree of the structure of ``params`` holding :data:`LAYER` or :data:`OUTSIDE`.
  """
  slots = find_layer_slots(params, captured=stats)
  entries = None if stats is None else layer_entries(stats)

  def label(keys: tuple[Any, ...], _: Any) -> str:
    path = path_of(keys)
    if not path:
      return OUTSIDE
    module, name = path[:-1], path[-1]
    slot = slots.get(module)
    inside = slot is not None and (name == KERNEL or (name == BIAS and slot.has_bias))
    if inside and entries is not None:
      inside = isinstance(entries.get(module), LayerStats)
    return LAYER if inside else OUTSIDE

  return jax.tree_util.tree_map_with_path(label, params)


__all__ = ["LAYER", "OUTSIDE", "layer_labels"]
