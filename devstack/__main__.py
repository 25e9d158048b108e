"""``python -m devstack``: the stack's command line (devstack.cli)."""

import sys

from devstack.cli import main

sys.exit(main())
