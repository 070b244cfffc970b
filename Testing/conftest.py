"""Make the engine package ``dlir`` importable from a plain checkout (no install needed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DLIRRegistration"))
