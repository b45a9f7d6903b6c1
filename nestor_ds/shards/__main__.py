"""`python -m nestor_ds.shards`: see cli.py."""

import sys

from .cli import main

sys.exit(main())
