"""``python -m dlirweb``: the ``dlir-web`` command."""

import sys

from .server import main

sys.exit(main())
