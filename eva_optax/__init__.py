"""eva_optax: Eva, the Kronecker-vectorized second-order optimizer, for Optax.

Public API::

    tx = eva_optax.eva(learning_rate, momentum=0.9, weight_decay=0.0,
                       damping=0.03, kl_clip=0.001, stat_decay=0.05)
    grad_fn = eva_optax.value_and_grad(loss_fn)
    loss, grads, stats = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    print(eva_optax.describe(params, stats))
"""

from eva_optax.capture import value_and_grad
from eva_optax.describe import describe
from eva_optax.eva import ScaleByEvaState, eva, scale_by_eva, sherman_morrison
from eva_optax.kl import kl_clip_factor, kl_normalise_factor
from eva_optax.layers import KernelLayout, LayerStats, PassThrough, layouts_of

__version__ = "0.1.0"

__all__ = [
    "KernelLayout",
    "LayerStats",
    "PassThrough",
    "ScaleByEvaState",
    "describe",
    "eva",
    "kl_clip_factor",
    "kl_normalise_factor",
    "layouts_of",
    "scale_by_eva",
    "sherman_morrison",
    "value_and_grad",
]
