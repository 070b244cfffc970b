"""``python -m dlir``: the ``dlir`` command."""

import sys

from .cli import main

sys.exit(main())
