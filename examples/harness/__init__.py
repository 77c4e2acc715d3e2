"""Shared pieces of the example scripts: optimizers, models, data, training loop, reports, CLI.

Every example (``examples/*.py``) describes its task -- a model, a loss, data -- as a
:class:`examples.harness.training.Task` and hands it to :func:`examples.harness.cli.run`,
which parses the common flags, builds the optimizers of :mod:`examples.harness.optimizers`,
trains each one from the same initial parameters on the same batches
(:class:`examples.harness.training.Trainer`, interleaved, with a tqdm bar, the orbax
checkpoints of :mod:`examples.harness.records` with ``--checkpoint`` and ``--resume``,
and where Eva's correction acts, :mod:`examples.harness.curvature`) and writes the report of
:mod:`examples.harness.report` (markdown table, ``metrics.json``, ``metrics.csv``; the PNG
plots of :mod:`examples.harness.plots`), with the final quality and time to target of
:mod:`examples.harness.targets`. The data loaders (Fashion-MNIST, CIFAR-10,
a text corpus) are the package :mod:`examples.harness.datasets`.
:mod:`examples.harness.protocol` is the tuning protocol applied alike to every optimizer
(the search of :mod:`~examples.harness.protocol_search` on a held-out validation split, then
the chosen values on several seeds, next to the paper's recipe; its statistics, tables and
record in :mod:`~examples.harness.protocol_summary`, :mod:`~examples.harness.protocol_tables`
and :mod:`~examples.harness.protocol_records`), run by ``python -m benchmarks.protocol``.
:mod:`examples.harness.compiled_ops` reads compiled programs (operations, collectives,
XLA's cost) and :mod:`examples.harness.traces` profiler traces, for the benchmarks.

The package is imported as ``examples.harness`` everywhere: the examples and benchmarks run
as modules from the repository root (``python -m examples.classifier``), the tests get the
root on the path from pytest (``pythonpath`` in ``pyproject.toml``).
"""
