"""The benchmarks of eva_optax: step time, state memory, scaling and convergence.

Each one is a module, run from the repository root (``make bench`` runs the first five)::

    python -m benchmarks.step_time      # step time, op counts and state size per optimizer
    python -m benchmarks.multi_device   # Eva / SGD step time over 1-8 data-parallel devices
    python -m benchmarks.protocol       # every optimizer tuned alike, seeds, budget to quality
    python -m benchmarks.knobs          # Eva's knobs one at a time around the protocol's choice
    python -m benchmarks.headline       # the protocols against SGD's and AdamW's quality
    python -m benchmarks.convergence    # untuned: wall time to SGD's quality, several seeds
    python -m benchmarks.sweep          # a hyperparameter grid of one optimizer against SGD
    bash benchmarks/gpu.sh              # op counts and step times on one GPU
    bash benchmarks/gpu_quality.sh      # time to quality on one GPU (the CIFAR recipe, the LM)

They train the models of the examples with the examples' harness, :mod:`examples.harness`;
results go to ``benchmarks/results/``.
"""
