"""`python -m scratchfs` is the `scratchfs` command."""

import sys

from scratchfs.cli import main

sys.exit(main())
