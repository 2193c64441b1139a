"""``HOST:PORT`` of the dashboard: parsing and the loopback test (shared by the config and the server)."""

from __future__ import annotations

import ipaddress
import re

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
MIN_TOKEN_CHARS = 16
_TOKEN = re.compile(rf"[A-Za-z0-9._~-]{{{MIN_TOKEN_CHARS},}}")


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ``("127.0.0.1", 8080)``; ``"[::1]:8080"`` for IPv6; port 0 = any free port.
    Raises ``ValueError`` saying what is wrong."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets ([::1]:8080), got {text!r}")
    if not host:
        raise ValueError(f"needs a host (0.0.0.0 for every address), got {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port_text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: only this machine can connect."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def valid_token(token: str) -> bool:
    """At least MIN_TOKEN_CHARS URL-safe characters (``[A-Za-z0-9._~-]``: the same in a URL, a header and a
    cookie), e.g. ``python -c 'import secrets; print(secrets.token_urlsafe(24))'``."""
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None


__all__ = ["MIN_TOKEN_CHARS", "is_loopback", "parse_listen", "valid_token"]
