"""`python -m stablediff ...` runs the same command line as the `stablediff` script."""

import sys

from stablediff.cli import main

sys.exit(main())
