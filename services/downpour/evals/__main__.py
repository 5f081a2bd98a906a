"""``python -m downpour.evals``: the ``downpour eval`` command on its own."""

import sys

from downpour.evals.cli import main

sys.exit(main())
