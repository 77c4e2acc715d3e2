"""eva_optax: Eva, the Kronecker-vectorized second-order optimizer, for Optax.

Public API::

    tx = eva_optax.eva(learning_rate, momentum=0.9, weight_decay=0.0,
                       damping=0.03, kl_clip=0.001, stat_decay=0.05)
    grad_fn = eva_optax.value_and_grad(loss_fn)
    loss, grads, stats = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    print(eva_optax.describe(params, stats))

The vectorized framework and its baselines share the API: ``eva_foof`` (Eva-f),
``eva_shampoo`` (Eva-s, gradient-only), ``kfac``, ``foof`` and ``shampoo``, each
with its ``scale_by_*`` preconditioner. Layer-wise ones need the statistics they
name in ``<module>.STATISTICS``, e.g.
``value_and_grad(loss_fn, statistics=eva_optax.KFAC_STATISTICS)``.
"""

from eva_optax._src.capture import PassThroughWarning
from eva_optax._src.linen_capture import value_and_grad
from eva_optax._src.describe import describe, negligible_fraction
from eva_optax._src.eva import STATISTICS as EVA_STATISTICS
from eva_optax._src.eva import ScaleByEvaState, eva, scale_by_eva, sherman_morrison
from eva_optax._src.eva_foof import STATISTICS as EVA_FOOF_STATISTICS
from eva_optax._src.eva_foof import ScaleByEvaFoofState, eva_foof, scale_by_eva_foof
from eva_optax._src.eva_shampoo import ScaleByEvaShampooState, eva_shampoo, scale_by_eva_shampoo
from eva_optax._src.foof import STATISTICS as FOOF_STATISTICS
from eva_optax._src.foof import FoofInverse, ScaleByFoofState, foof, scale_by_foof
from eva_optax._src.grafting import graft_to_norm, sgd_graft
from eva_optax._src.kfac import STATISTICS as KFAC_STATISTICS
from eva_optax._src.kfac import KfacInverses, ScaleByKfacState, kfac, scale_by_kfac
from eva_optax._src.kl import kl_clip_factor, kl_normalise_factor
from eva_optax._src.labels import layer_labels
from eva_optax._src.memory import state_bytes
from eva_optax._src.nnx_capture import nnx_value_and_grad
from eva_optax._src.preconditioning import FactorGate, factors_due
from eva_optax._src.state_needs import has_factor_gate, statistics_needed
from eva_optax._src.state_sharding import state_shardings
from eva_optax._src.statistics import KernelLayout, LayerStats, PassThrough, layouts_of
from eva_optax._src.shampoo import ScaleByShampooState, scale_by_shampoo, shampoo
from eva_optax._src.train_state import TrainState

__version__ = "0.1.0"

__all__ = [
  "EVA_FOOF_STATISTICS",
  "FactorGate",
  "EVA_STATISTICS",
  "FOOF_STATISTICS",
  "KFAC_STATISTICS",
  "KernelLayout",
  "LayerStats",
  "PassThrough",
  "PassThroughWarning",
  "ScaleByEvaFoofState",
  "ScaleByEvaShampooState",
  "ScaleByEvaState",
  "ScaleByFoofState",
  "FoofInverse",
  "KfacInverses",
  "ScaleByKfacState",
  "ScaleByShampooState",
  "TrainState",
  "describe",
  "eva",
  "eva_foof",
  "eva_shampoo",
  "factors_due",
  "foof",
  "graft_to_norm",
  "has_factor_gate",
  "kfac",
  "kl_clip_factor",
  "kl_normalise_factor",
  "layer_labels",
  "layouts_of",
  "negligible_fraction",
  "nnx_value_and_grad",
  "scale_by_eva",
  "scale_by_eva_foof",
  "scale_by_eva_shampoo",
  "scale_by_foof",
  "scale_by_kfac",
  "scale_by_shampoo",
  "sgd_graft",
  "state_bytes",
  "state_shardings",
  "statistics_needed",
  "shampoo",
  "sherman_morrison",
  "value_and_grad",
]
