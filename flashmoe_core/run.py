"""``python -m flashmoe_core.run``: the layer's benchmark and check command
(:mod:`flashmoe_core.cli.run`)."""

import sys

from .cli.run import main

if __name__ == "__main__":
    sys.exit(main())
