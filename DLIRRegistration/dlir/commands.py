"""Sub-commands contributed by other engine modules (training, evaluation, benchmark).

Each entry is ``(name, help, add_arguments(parser), run(args) -> exit code)``; see :mod:`dlir.cli`.
"""

from __future__ import annotations

EXTRA_COMMANDS: list = []
