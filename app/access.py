"""Who may run the model and write to the database when the server is reachable beyond this machine.

On a loopback address (the default, 127.0.0.1) every route is open: only local processes can
connect. Bound anywhere else, the routes that run the model (chat, steering, trace, compare, the
OpenAI-compatible `/v1`) and the ones that write (steering presets) need `Authorization: Bearer
<STARMAP_API_TOKEN>`; without a token set, the server refuses to start (`check_exposure`).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.state import AppState, get_state
from starmap.settings import Settings

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="StarMapToken",
    description="`Authorization: Bearer <STARMAP_API_TOKEN>`; required only when the server is bound beyond loopback.",
)


class ExposureError(ValueError):
    """The server would be reachable from other machines without an API token."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def exposed(settings: Settings) -> bool:
    """Bound beyond loopback: model runs and writes need the API token."""
    return not is_loopback(settings.host)


def check_exposure(settings: Settings) -> None:
    if exposed(settings) and not settings.api_token:
        raise ExposureError(
            f"refusing to serve on {settings.host} without an API token: set STARMAP_API_TOKEN (clients then send "
            "'Authorization: Bearer <token>'), or bind 127.0.0.1"
        )


def require_token(
    state: Annotated[AppState, Depends(get_state)], credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """401 unless the server is on loopback or the request carries the API token."""
    settings = state.settings
    if not exposed(settings):
        return
    token = (settings.api_token or "").encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not token or not hmac.compare_digest(given, token):
        raise HTTPException(
            401,
            detail=f"this server is bound to {settings.host}: send the header 'Authorization: Bearer <STARMAP_API_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


TokenDep = Depends(require_token)
