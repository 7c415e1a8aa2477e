"""``python -m stablelse.bench [options]``, the same as ``python -m stablelse bench``."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
