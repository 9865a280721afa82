"""``python -m convserve.client`` runs the ``convserve`` command."""

import sys

from convserve.client.cli import main

# Guarded: bench's worker processes are spawned and re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
