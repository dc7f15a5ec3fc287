"""The distributed mode's tests share the parity helpers of tests/client and the browser
helpers of tests/browser."""

from __future__ import annotations

import sys
from pathlib import Path

for helpers in ("client", "browser"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / helpers))
