"""``python -m examples.harness.datasets``: :func:`examples.harness.datasets.check.main`."""

import sys

from examples.harness.datasets.check import main

sys.exit(main())
