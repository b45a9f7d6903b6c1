"""The one exception type for the user's mistakes.

Why: the entries print a user's mistake (a bad config key, a missing shard directory, a malformed DeepSpeed JSON,
an unsupported library version) as one line and exit 2, but a ValueError from our own code is a bug whose
traceback must be seen. Checks of the user's input raise `UserError` (a ValueError, so callers and tests that
expect ValueError keep working); `nestor_ds.cli.run_cli` turns only these into one line.
"""

from __future__ import annotations


class UserError(ValueError):
    """The user's input is wrong (config, data, paths, DeepSpeed JSON, installed versions); str() is one line that
    names what to fix."""
