"""`python -m tools.loadtest`: see tools/loadtest/run.py."""

import sys

from tools.loadtest.run import main

sys.exit(main())
