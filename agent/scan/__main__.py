"""``python -m agent.scan``: the scan child process (see agent.scan.runner)."""

import sys

from agent.scan.runner import main

sys.exit(main())
