"""``python -m adamscope.service.cli``: the console script ``adamscope``."""

import sys

from . import main

sys.exit(main())
