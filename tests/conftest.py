"""Eight CPU devices for the whole suite, so that multi-device behaviour is tested.

The flag must be set before JAX initialises its backends; single-device tests
are unaffected (their arrays live on the first device).
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

import jax  # noqa: E402  (after the flag: JAX reads XLA_FLAGS when its backends start)
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def quick_compiles():
  """Fewer XLA optimisation passes for one test module.

  For modules of tiny programs compiled once and run once, where compilation
  is nearly all of the run time (on 2 CPU cores); the values computed are the
  same programs' values. Use it with
  ``pytestmark = pytest.mark.usefixtures("quick_compiles")``.
  """
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)
