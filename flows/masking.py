"""Credentials kept out of everything the pipeline prints, logs, tags or publishes.

A tracking URI (or any URI a config holds: a data source, a storage path, a Ray address) may carry a
user and password (`http://user:pass@host`) or a token in its query string (`?password=...`,
`X-Amz-Signature=...`). The real value is used only to connect; `mask_uri` is what every printed
line, MLflow param or tag, Prefect artifact and error message shows instead. It works on any text,
so an error message that quotes a URI is masked the same way.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://userinfo@ : the userinfo runs to the authority's last '@' (an unencoded '@' in a password
# still ends up masked).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
# ?password=... &token=... &X-Amz-Signature=... : a query value whose key names a secret.
_QUERY_SECRET = re.compile(r"(?P<key>[?&;][^=&#\s]*(?:pass|pwd|secret|token|key|sig|credential|auth)[^=&#\s]*=)"
                           r"(?P<value>[^&#\s]*)", re.IGNORECASE)


def mask_uri(text: str) -> str:
    """text with the credentials of every URI in it replaced by ***: `http://u:p@h/x` -> `http://***@h/x`."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)


def mask_values(values: dict[str, str]) -> dict[str, str]:
    """{key: mask_uri(value)}: MLflow params and tags, lineage, anything shown as key/value pairs."""
    return {k: mask_uri(str(v)) for k, v in values.items()}
