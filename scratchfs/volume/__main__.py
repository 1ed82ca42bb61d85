"""`python -m scratchfs.volume`: the volume CLI on its own."""

import sys

from scratchfs.volume.cli import main

sys.exit(main())
