"""`python -m nestor_ds.synth`: see cli.py."""

import sys

from .cli import main

sys.exit(main())
