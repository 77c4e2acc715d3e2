"""The implementation of eva_optax; the public names are those of :mod:`eva_optax`."""
