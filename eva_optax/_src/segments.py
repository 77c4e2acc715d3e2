"""Per-layer sums of many small vectors in one operation.

Eva's curvature is a handful of vectors per layer (ā, ḡ, the bias gradient), and
its rule needs a few dot products of them per layer (‖ā‖², ‖ḡ‖², ḡ·∇b, ‖∇b‖²).
Written layer by layer, each is its own small reduction: on an accelerator, one
kernel launch each, several per layer. :class:`Segments` packs such vectors of
every layer into one flat array and sums each layer's part with one
``segment_sum``, so their cost does not grow with the depth of the model.

A "layer" here may be a stack of layers (``nn.scan``): a vector of shape
``stack + (n,)`` is ``prod(stack)`` segments, each summed on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Segments:
  """Layers' per-stack-entry slots in a packed vector of sums.

  Args:
    stacks: the stack shape of every layer (``()`` for a plain layer).

  Each layer ``l`` owns ``prod(stacks[l])`` consecutive slots; :meth:`dots`
  returns one value per slot, :meth:`of` gives a layer's values back in its
  stack shape.
  """

  def __init__(self, stacks: Sequence[tuple[int, ...]]):
    self.stacks = [tuple(s) for s in stacks]
    sizes = [math.prod(s) for s in self.stacks]
    self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(int)
    self.size = int(self.offsets[-1])

  def __len__(self) -> int:
    return len(self.stacks)

  def dots(self, *groups: Sequence[tuple[jax.Array, jax.Array] | None]) -> list[jax.Array]:
    """Per-slot dot products ``x · y`` over the last axis, for several groups at once.

    Args:
      *groups: each a sequence with, per layer, a pair of arrays ``stack + (n,)``
        (``n`` may differ between layers) or ``None`` (its dots are 0).

    Returns:
      Per group, an array of shape ``(self.size,)``: entry ``offsets[l] + j``
      is ``x · y`` of the ``j``-th stacked vectors of layer ``l``. The vectors
      are packed first and multiplied once, and all the dots come from one
      ``segment_sum``: three operations, whatever the number of layers.
    """
    xs, ys, ids = [], [], []
    for g, group in enumerate(groups):
      if len(group) != len(self.stacks):
        raise ValueError(f"group {g} has {len(group)} entries for {len(self.stacks)} layers")
      for l, pair in enumerate(group):
        if pair is None:
          continue
        x, y = pair
        first = int(g * self.size + self.offsets[l])
        count, n = math.prod(self.stacks[l]), x.shape[-1]
        xs.append(x.reshape(-1))
        ys.append(y.reshape(-1))
        # Built from iotas, not a numpy constant: the sums also run inside a
        # custom_partitioning op (eva_optax.sharded_sums), whose body may close
        # over no array; XLA folds it to a constant all the same.
        slots = jax.lax.broadcasted_iota(jnp.int32, (count, n), 0) + first
        ids.append(slots.reshape(-1))
    if not xs:
      return [jnp.zeros((self.size,), jnp.float32) for _ in groups]
    dtype = jnp.result_type(*xs, *ys)
    dots = jax.ops.segment_sum(
      jnp.concatenate(xs).astype(dtype) * jnp.concatenate(ys).astype(dtype),
      jnp.concatenate(ids),
      num_segments=len(groups) * self.size,
      indices_are_sorted=True,
    )
    return [dots[g * self.size : (g + 1) * self.size] for g in range(len(groups))]

  def pack(self, per_layer: Sequence[jax.Array]) -> jax.Array:
    """Per-layer arrays of their stack shape, as one ``(self.size,)`` array."""
    return jnp.concatenate([jnp.reshape(v, -1) for v in per_layer])

  def indicator(self, flags: Sequence[bool]) -> jax.Array:
    """A per-layer flag on every slot of its layer: a constant ``(self.size,)`` array
    (built from literals, so that it may appear inside a ``custom_partitioning`` op)."""
    return jnp.concatenate(
      [jnp.full((int(n),), float(f), jnp.float32) for f, n in zip(flags, np.diff(self.offsets))]
      or [jnp.zeros((0,), jnp.float32)]
    )

  def of(self, packed: jax.Array, layer: int) -> jax.Array:
    """Layer ``layer``'s slots of a ``(self.size,)`` array, in its stack shape."""
    lo, hi = self.offsets[layer], self.offsets[layer + 1]
    return packed[lo:hi].reshape(self.stacks[layer])


def sums_in_one_pass(
  first: jax.Array, second: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  """``first.sum(axes)`` and ``second.sum(axes)`` as one reduction (one pass, one kernel)."""
  zero = jnp.zeros((), jnp.result_type(first, second))
  return jax.lax.reduce(
    (first.astype(zero.dtype), second.astype(zero.dtype)),
    (zero, zero),
    lambda x, y: (x[0] + y[0], x[1] + y[1]),
    axes,
  )
