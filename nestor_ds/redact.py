"""Mask credentials in URIs before anything is printed, logged to MLflow or stored beside a checkpoint.

A tracking URI such as ``http://alice:s3cret@mlflow.example:5000`` works with MLflow, but the password must not
reach the config printout, the run's parameters, `nestor_config.json` in checkpoints, exported files or log lines.
The supported way to pass credentials is MLflow's own environment variables (`MLFLOW_TRACKING_USERNAME`,
`MLFLOW_TRACKING_PASSWORD`, `MLFLOW_TRACKING_TOKEN`), which nothing here records.
"""

from __future__ import annotations

import re
from typing import Any

# scheme://user[:password]@host -> scheme://***@host (the whole user-info part: a token may sit in either half)
_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
MASK = "***"


def mask_secrets(text: str) -> str:
    """`text` with the user-info part of every URL in it replaced by ***."""
    return _USERINFO_RE.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def redact(obj: Any) -> Any:
    """A copy of nested dicts / lists / strings with every URL's credentials masked (other values as they are)."""
    if isinstance(obj, str):
        return mask_secrets(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj
