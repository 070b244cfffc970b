"""``python -m dlir``: the ``dlir`` command (Ctrl-C at any moment, start-up included: "interrupted", exit code 130)."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
