"""``python -m flashmoe_core.build``: compile kernels ahead of time
(:mod:`flashmoe_core.cli.build`)."""

import sys

from .cli.build import main

if __name__ == "__main__":
    sys.exit(main())
