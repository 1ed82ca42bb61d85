"""`python -m tools.seal` == `scanner-seal`."""

import sys

from tools.seal.cli import main

sys.exit(main())
