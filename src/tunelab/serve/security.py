"""Bearer-token auth and the rule that a server reachable from other machines must have a key."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket

from tunelab.serve.errors import APIError

API_KEY_ENV = "TUNELAB_API_KEY"


def api_key_from(option: str | None) -> str | None:
    """``--api-key`` wins over ``$TUNELAB_API_KEY``; empty means none."""
    key = option if option is not None else os.environ.get(API_KEY_ENV)
    return key or None


def is_loopback(host: str) -> bool:
    """True only when every address ``host`` names is a loopback one (``localhost``, 127.x, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose an unauthenticated model server to the network."""
    if api_key is None and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without an API key: anyone who can reach this address could use "
            f"the model. Pass --api-key KEY (or set {API_KEY_ENV}), or bind to 127.0.0.1."
        )


def check_bearer(authorization: str | None, api_key: str | None, *, admin: bool = False) -> None:
    """Raise a 401 unless the ``Authorization: Bearer <key>`` header matches; constant-time compare.

    Admin endpoints change what the server serves, so they need a key even on loopback.
    """
    if api_key is None:
        if admin:
            raise APIError(
                403,
                f"admin endpoints are disabled because the server has no API key; restart it with --api-key "
                f"(or {API_KEY_ENV}) and send 'Authorization: Bearer <key>'",
                type="permission_error",
                code="admin_disabled",
            )
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401,
            "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )
