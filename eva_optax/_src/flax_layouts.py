"""Flax's naming conventions for kernel layouts, given to the optimizers' ``init``.

``tx.init(params)`` sees only the parameters, and their shapes fix most layouts
(:func:`eva_optax._src.layers.possible_layouts`). Where they do not, the names Flax gives its
modules say more; this module tells :mod:`eva_optax._src.layers` so through its one hook,
:func:`~eva_optax._src.layers.set_naming_convention`, when the front-ends are imported
(``import eva_optax`` does). The capture still records every layer's true layout and the
optimizers check it, so a convention that reads a kernel wrongly is an error at the first
update, never a silent approximation.

- ``query``, ``key``, ``value``: the input projections of ``nn.MultiHeadDotProductAttention``
  and ``nnx.MultiHeadAttention``, a bias-free kernel ``(features, heads, head_dim)`` (after
  one stack axis under ``nn.scan``): two output axes, and no other reading.
- ``out``: their output projection, ``(heads, head_dim, features)``: two input axes, the
  shape's guess, and no other reading at rank 3; at rank 4 also attention's output under
  ``nn.scan`` (one stack axis) beside a Conv.
- a module named like an Einsum (Linen's ``Einsum_0``, Gemma's ``kv_einsum``): a bias-free
  kernel of rank ≥ 4 can contract any one of its axes ('BSD,CKDH->CBSKH').
"""

from __future__ import annotations

from eva_optax._src.layers import NameReading, set_naming_convention
from eva_optax._src.statistics import KernelLayout

_ATTENTION_INPUT_PROJECTIONS = ("query", "key", "value")
_ATTENTION_OUTPUT_PROJECTION = "out"


def flax_names(kernel_shape: tuple[int, ...], name: str) -> NameReading | None:
  """What Flax's name ``name`` says of a bias-free kernel of shape ``kernel_shape``."""
  rank = len(kernel_shape)
  if name in _ATTENTION_INPUT_PROJECTIONS:
    guess = KernelLayout(rank - 3, 2) if rank in (3, 4) else None
    return NameReading(guess=guess, closed=True)
  if name == _ATTENTION_OUTPUT_PROJECTION and rank == 3:
    return NameReading(closed=True)
  if name == _ATTENTION_OUTPUT_PROJECTION and rank == 4:
    return NameReading(more=(KernelLayout(1, 1),))
  if rank >= 4 and "einsum" in name.lower():
    contract_one = tuple(
      KernelLayout(0, rank - 1, permutation=(i,) + tuple(a for a in range(rank) if a != i))
      for i in range(1, rank)
    )
    return NameReading(more=contract_one + (KernelLayout(0, rank - 1),))
  return None


set_naming_convention(flax_names)
