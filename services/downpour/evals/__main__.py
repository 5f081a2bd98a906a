import sys

from downpour.evals import main

sys.exit(main())
