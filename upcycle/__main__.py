"""``python -m upcycle ...`` is the ``upcycle`` command."""

import sys

from upcycle.cli import main

sys.exit(main())
