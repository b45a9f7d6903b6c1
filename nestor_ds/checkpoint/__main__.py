"""`python -m nestor_ds.checkpoint`: see cli.py."""

import sys

from .cli import main

sys.exit(main())
