"""The example scripts of eva_optax, and their shared harness (not part of the library).

Every example is a module, run from the repository root::

    python -m examples.autoencoder      # the make demo job
    python -m examples.classifier
    python -m examples.cifar10
    python -m examples.char_lm
    python -m examples.multi_device

:mod:`examples.harness` holds what they share: the optimizer registry, the models, the
training loop, the reports, the command line, the data loaders
(:mod:`examples.harness.datasets`) and the compiled-op counter. The benchmarks
(:mod:`benchmarks`) and the tests import it under that name.
"""
