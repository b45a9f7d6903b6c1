"""Mask credentials before anything is printed, logged to MLflow or stored beside a checkpoint.

A tracking URI such as ``http://alice:s3cret@mlflow.example:5000`` works with MLflow, and a dataset path such as
``pipe:curl -s -H 'Authorization: Bearer abc' https://host/train-000000.tar`` or a presigned
``https://bucket.s3.amazonaws.com/train-000000.tar?X-Amz-Credential=...&X-Amz-Signature=...`` works with the data
pipeline, but the secret in each must not reach the config printout, the run's parameters and tags,
`nestor_config.json` in checkpoints, exported files or log lines. Masked here, in one place, are:

- the user-info part of a URL (``scheme://user:pass@host`` -> ``scheme://***@host``);
- the value of a ``name=value`` assignment whose name says it holds a secret: environment assignments
  (``AWS_SECRET_ACCESS_KEY=...``, ``GITHUB_TOKEN=...``), command-line options (``--password=...``) and URL query
  parameters (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``access_token``, ``sig``,
  ``token``, ``key``, ...);
- the value of an HTTP header that carries credentials (``Authorization: Bearer ...``, ``X-Api-Key: ...``,
  ``Cookie: ...``) and a bare ``Bearer <token>``;
- in nested dicts, the whole value of a key whose name says it holds a secret (``{"aws_secret_access_key": ...}``).

Masking errs towards hiding too much (a path that merely contains ``token=`` loses its value in printouts): a
printout is for reading, and the run itself always uses the unmasked value. The supported way to pass MLflow
credentials is MLflow's own environment variables (`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`,
`MLFLOW_TRACKING_TOKEN`), which nothing here records.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# a name (environment variable, option, query parameter, header, dict key) that says its value is a secret;
# `token` only at the end, so that `token_lb` or `tokens_per_sample` stay readable
_SECRET_NAME_RE = re.compile(
    r"(?i)secret|passw(?:or)?d|credential|signature|api[-_]?key|private[-_]?key|access[-_]?key|token$"
)
# short query-parameter names that hold a secret on their own (Azure SAS `sig`, API `key`, ...)
_SECRET_QUERY_NAMES = frozenset({"sig", "key", "auth", "pass", "pwd", "code"})
# scheme://user[:password]@host -> scheme://***@host (the whole user-info part: a token may sit in either half)
_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
# an HTTP header whose value is a credential, up to the end of its quoting (curl -H 'Authorization: Bearer abc')
_HEADER_RE = re.compile(
    r"(?i)(?P<name>\b(?:proxy-)?authorization|\bcookie|\b[\w-]*(?:api-key|token|secret)\b)"
    r"(?P<sep>\s*:\s*)(?P<value>[^'\"\r\n]+)"
)
_BEARER_RE = re.compile(r"(?i)(?P<name>\bbearer\s+)(?P<value>[^\s'\"*][^\s'\"]*)")
# ?name=value / &name=value of a URL
_QUERY_RE = re.compile(r"(?P<name>[?&;][\w.-]+=)(?P<value>[^&#\s'\"]+)")
# NAME=value (environment assignment, --option=value); the value quoted or bare
_ASSIGN_RE = re.compile(r"(?P<name>(?<![\w.-])[\w.-]+\s*=)(?P<value>\"[^\"]*\"|'[^']*'|[^\s&#'\";]+)")


def is_secret_name(name: str) -> bool:
    """True when a name says its value is a secret (`AWS_SECRET_ACCESS_KEY`, `X-Amz-Signature`, `access_token`)."""
    return bool(_SECRET_NAME_RE.search(name.strip(" =-?&;")))


def _masked(m: re.Match[str], secret: bool = True) -> str:
    """The match with its value replaced by ***, when `secret`."""
    return f"{m['name']}{m.groupdict().get('sep') or ''}{MASK}" if secret else m[0]


def mask_secrets(text: str) -> str:
    """`text` with every credential the module docstring lists replaced by ***."""
    text = _USERINFO_RE.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _HEADER_RE.sub(_masked, text)
    text = _BEARER_RE.sub(_masked, text)
    name = lambda m: m["name"].strip(" =?&;")  # noqa: E731 - the parameter or variable name of a match
    text = _QUERY_RE.sub(lambda m: _masked(m, name(m).lower() in _SECRET_QUERY_NAMES or is_secret_name(name(m))), text)
    return _ASSIGN_RE.sub(lambda m: _masked(m, is_secret_name(name(m))), text)


def redact(obj: Any) -> Any:
    """A copy of nested dicts / lists / strings with every credential masked (other values as they are); the value
    of a dict key named like a secret is masked whole."""
    if isinstance(obj, str):
        return mask_secrets(obj)
    if isinstance(obj, dict):
        return {k: MASK if isinstance(v, str) and v and is_secret_name(str(k)) else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj
