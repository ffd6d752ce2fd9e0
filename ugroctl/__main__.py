"""``python -m ugroctl``: the same as the ``ugroctl`` console script."""

import sys

from ugroctl.cli import main

sys.exit(main())
