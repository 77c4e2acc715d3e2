"""Shared pieces of the example scripts: optimizers, models, training loop, reports, CLI.

Every example (``examples/*.py``) describes its task -- a model, a loss, data -- as a
:class:`harness.training.Task` and hands it to :func:`harness.cli.run`, which parses the
common flags, builds the optimizers of :mod:`harness.optimizers`, trains each one from the
same initial parameters on the same batches (:func:`harness.training.train`, with a tqdm
bar, orbax checkpoints and ``--resume``) and writes the report of :mod:`harness.report`
(markdown table, ``metrics.json``, ``metrics.csv``, PNG plots).

The scripts put ``examples/`` on ``sys.path`` by being run from it (``python
examples/classifier.py``); tests and benchmarks insert it themselves.
"""
