"""Where the optimizer state lives when the parameters are sharded over a mesh.

The curvature state of every optimizer here (vectors ā, ḡ, per-dimension
vectors, factors, inverses, roots, counts) is small next to the parameters and
the same on every device, so it is **replicated** over the mesh the
parameters live on. :func:`replicate_on_params_mesh` places a freshly built
state there when ``init`` is called eagerly on parameters placed with a
:class:`jax.sharding.NamedSharding` (replicated or FSDP-sharded); under
``jit``/``eval_shape`` (traced parameters) the state is left to the caller's
shardings. Under data parallelism every device then computes the same
(redundant) inverses and roots from the same global statistics, which costs
no communication.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec


def params_mesh(params: Any) -> jax.sharding.Mesh | None:
  """The mesh of the first concrete parameter placed with a ``NamedSharding``, if any."""
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      sharding = getattr(leaf, "sharding", None)
      if isinstance(sharding, NamedSharding):
        return sharding.mesh
  return None


def replicate_on_params_mesh(params: Any, state: Any) -> Any:
  """``state`` replicated over the parameters' mesh; unchanged without one."""
  mesh = params_mesh(params)
  if mesh is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
    return state
  return jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
