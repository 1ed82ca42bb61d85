"""`python -m tools.platform` == `scanner-platform`."""

import sys

from tools.platform.cli import main

sys.exit(main())
