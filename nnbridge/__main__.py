"""``python -m nnbridge`` runs the CLI."""

import sys

from nnbridge.cli import main

sys.exit(main())
