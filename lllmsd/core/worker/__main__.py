"""``python -m lllmsd.core.worker FD``: a model's worker process (see main.py)."""

import sys

from lllmsd.core.worker.main import main

sys.exit(main(sys.argv[1:]))
