"""Eight CPU devices for the whole suite, so that multi-device behaviour is tested.

The flag must be set before JAX initialises its backends; single-device tests
are unaffected (their arrays live on the first device).
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
