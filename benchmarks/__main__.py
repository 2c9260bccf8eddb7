"""`python -m benchmarks [--quick] [--write-results] ...`: see benchmarks/README.md."""

import sys

from benchmarks.runner import main

sys.exit(main())
