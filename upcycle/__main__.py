"""``python -m upcycle ...`` is the ``upcycle`` command."""

import sys

try:  # importing torch and transformers takes seconds: Ctrl-C then must not print a traceback
    from upcycle.cli import main
except KeyboardInterrupt:
    print("upcycle: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
