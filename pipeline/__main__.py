"""`python -m pipeline` is the `eleatt` command."""
import sys

from pipeline.cli import main

sys.exit(main())
