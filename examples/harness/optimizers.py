"""The optimizers the examples compare, built the same way for every task.

Every optimizer gets the same learning-rate schedule shape, momentum 0.9 wherever it
has momentum, and L2 weight decay added to the gradient (``weight_decay`` × params),
except AdamW whose decay is decoupled. ``capture`` says how a step gets its gradients:

- ``"plain"``: ``jax.value_and_grad`` (SGD, AdamW, Eva-s, Shampoo);
- ``"stats"``: ``eva_optax.value_and_grad(..., statistics=spec.statistics)`` (Eva, Eva-f);
- ``"gated"``: the same, with ``factors_due=eva_optax.factors_due(opt_state)`` so that the
  Kronecker factors are only computed on the steps that use them (K-FAC, FOOF).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optax

import eva_optax


@dataclass(frozen=True)
class Options:
    """Hyperparameters shared by every optimizer of a run (``None``: the optimizer's default)."""

    momentum: float = 0.9
    weight_decay: float = 5e-4
    damping: float | None = None
    kl_clip: float | None = None


@dataclass(frozen=True)
class Spec:
    """One optimizer: its ``--optimizers`` key, display name, constructor and capture."""

    key: str
    name: str
    factory: Callable[..., optax.GradientTransformation]
    capture: str  # "plain" | "stats" | "gated"
    statistics: Any = None
    extra: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments of ``factory``

    def accepts(self, argument: str) -> bool:
        """Whether the constructor takes ``argument`` (e.g. ``damping``, ``kl_clip``)."""
        return argument in inspect.signature(self.factory).parameters

    def build(
        self, learning_rate: optax.ScalarOrSchedule, options: Options, **kwargs: Any
    ) -> optax.GradientTransformation:
        """The transformation, with ``options`` applied where the optimizer has them.

        ``kwargs`` go to the eva_optax constructor (e.g. ``layouts=``).
        """
        if self.key == "sgd":
            return optax.chain(
                optax.add_decayed_weights(options.weight_decay),
                optax.sgd(learning_rate, momentum=options.momentum),
            )
        if self.key == "adamw":
            return optax.adamw(learning_rate, weight_decay=options.weight_decay)
        kwargs = {**dict(self.extra), **kwargs}
        kwargs.update(momentum=options.momentum, weight_decay=options.weight_decay)
        for name in ("damping", "kl_clip"):
            value = getattr(options, name)
            if value is not None and self.accepts(name):
                kwargs[name] = value
        return self.factory(learning_rate, **kwargs)


SPECS: tuple[Spec, ...] = (
    Spec("sgd", "SGD", optax.sgd, "plain"),
    Spec("adamw", "AdamW", optax.adamw, "plain"),
    Spec("eva", "Eva", eva_optax.eva, "stats", eva_optax.EVA_STATISTICS),
    Spec("eva-f", "Eva-f", eva_optax.eva_foof, "stats", eva_optax.EVA_FOOF_STATISTICS),
    Spec("eva-s", "Eva-s", eva_optax.eva_shampoo, "plain"),
    Spec(
        "kfac", "K-FAC", eva_optax.kfac, "gated", eva_optax.KFAC_STATISTICS,
        extra=(("stats_every", 10), ("inverse_every", 10)),
    ),
    Spec(
        "foof", "FOOF", eva_optax.foof, "gated", eva_optax.FOOF_STATISTICS,
        extra=(("stats_every", 10), ("inverse_every", 10)),
    ),
    Spec("shampoo", "Shampoo", eva_optax.shampoo, "plain"),
)
SPEC_BY_KEY: dict[str, Spec] = {s.key: s for s in SPECS}


def parse_keys(text: str) -> list[Spec]:
    """``"sgd,eva"`` → the specs, in that order; ``ValueError`` naming unknown keys."""
    wanted = [w.strip().lower() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in SPEC_BY_KEY]
    if unknown or not wanted:
        raise ValueError(
            f"--optimizers: unknown {unknown or text!r}; choose from {','.join(SPEC_BY_KEY)}"
        )
    return [SPEC_BY_KEY[w] for w in dict.fromkeys(wanted)]
