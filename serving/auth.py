"""Optional bearer-token auth for the HTTP app.

The token comes from the service option or the env var ENDOFLOW_API_TOKEN (a k8s Secret wired in as that variable).
Probes and the static page stay open: health endpoints must answer kubelets that hold no token, and the page
itself carries no data (its API calls send the token the user types in).
"""

from __future__ import annotations

import hmac
import os

from serving.errors import RequestError

TOKEN_ENV = "ENDOFLOW_API_TOKEN"
OPEN_PATHS = frozenset({"/", "/healthz", "/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json", "/docs"})


def resolve_token(option: str | None) -> str | None:
    """The option wins; an empty string anywhere means no auth."""
    token = option if option is not None else os.environ.get(TOKEN_ENV)
    return token or None


def check(token: str | None, path: str, authorization: str | None) -> None:
    """Raise RequestError 401 unless auth is off, the path is open, or the header carries the token."""
    if token is None or path in OPEN_PATHS:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):  # constant time
        raise RequestError(401, "invalid bearer token")
