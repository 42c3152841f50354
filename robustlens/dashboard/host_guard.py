"""DNS-rebinding guard for the served dashboard: HTTP and WebSocket requests must name this server.

A page on ``http://evil.example`` whose DNS name is re-pointed at 127.0.0.1 is, to the browser, the same
origin as the attacker's page: it can load the dashboard, open its WebSocket and drive every page (tag,
review, export) with the user's access. What gives it away is the ``Host`` header (``evil.example:8501``)
and, on the WebSocket, the ``Origin`` header. :class:`HostGuard` refuses, with 403, every request whose
``Host`` is not one of the names this server is known by, and every request whose ``Origin`` (when the
browser sends one) is not on such a name:

* the loopback names ``127.0.0.1``, ``localhost`` and ``::1`` (``[::1]`` in a URL), whatever the bind address;
* the ``--host`` the server was started with (unless it is a wildcard: ``0.0.0.0`` or ``::``);
* the names given with ``robustlens serve --allowed-host NAME`` (repeatable), e.g. the machine's DNS name
  when the dashboard is reached through it;
* with a wildcard bind (``--host 0.0.0.0``), any IP address typed as such (``http://10.0.0.5:8501``): an IP
  literal cannot be re-pointed by DNS, so only *names* need ``--allowed-host``.

Ports are not compared (a rebinding page uses the server's own port anyway). The guard is Starlette/ASGI
middleware installed through Streamlit's public ``st.App(middleware=...)`` (see ``server_app.py``); its
configuration travels from ``robustlens serve`` in the environment (:data:`BIND_ENV`, :data:`ALLOWED_ENV`),
and with neither set only the loopback names are accepted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from robustlens.errors import ValidationError

LOGGER = logging.getLogger("robustlens.dashboard.host_guard")

BIND_ENV = "ROBUSTLENS_BIND_HOST"
ALLOWED_ENV = "ROBUSTLENS_ALLOWED_HOSTS"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")  # noqa: S104 - names the wildcard binds, to recognise them
REFUSAL = (
    b"403 Forbidden: this dashboard does not answer to that host name. If you reached it through a "
    b"name of this machine, restart it with `robustlens serve ... --allowed-host NAME`.\n"
)


def normalize_host(value: str) -> str:
    """A host name as compared by the guard: lower case, no trailing dot, IPv6 without brackets, IP addresses
    in canonical form (``0:0:0:0:0:0:0:1`` → ``::1``). No port. Raises :class:`ValueError` when ``value`` is
    not a plausible host name or address."""
    host = value.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c in host for c in "/\\@?#[] \t") or any(ord(c) < 33 for c in host):
        raise ValueError(f"not a host name or address: {value!r}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host:
        raise ValueError(f"not a host name or address (give it without a port): {value!r}")
    return host


def host_of_header(value: str) -> str | None:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), normalized; ``None`` when the
    header cannot be read."""
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
    else:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        if port and not port.isdigit():
            return None
        if not host:
            host = value
    try:
        return normalize_host(host)
    except ValueError:
        return None


def host_of_origin(value: str) -> str | None:
    """The host of an ``Origin`` header (``http://name:port``), normalized; ``None`` for ``null`` or junk."""
    try:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        return normalize_host(parts.hostname)
    except ValueError:
        return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which ``Host`` / ``Origin`` names a server bound to ``bind`` answers to (see the module docs).

    Parameters
    ----------
    bind:
        The address the server listens on (``--host``).
    allowed:
        Extra names or addresses (``--allowed-host``), without ports.
    """

    def __init__(self, bind: str = "127.0.0.1", allowed: Iterable[str] = ()):
        self.wildcard = bind.strip() in WILDCARD_BINDS
        names = set(LOOPBACK_NAMES)
        if not self.wildcard:
            try:
                names.add(normalize_host(bind))
            except ValueError as exc:
                raise ValidationError(f"--host: {exc}") from None
        for name in allowed:
            try:
                names.add(normalize_host(name))
            except ValueError as exc:
                raise ValidationError(f"--allowed-host: {exc}") from None
        self.names = frozenset(names)

    def allows(self, host: str | None) -> bool:
        """Whether a normalized host name (``None``: unreadable) is one this server answers to."""
        if host is None:
            return False
        return host in self.names or (self.wildcard and _is_ip(host))

    def refusal(self, headers: Mapping[str, str], *, websocket: bool) -> str | None:
        """Why a request with these (lower-case) headers is refused, or ``None`` when it may pass.

        ``Host`` must be allowed (a request without one is refused: every HTTP/1.1 client sends it). A
        browser's ``Origin``, when present, must be on an allowed host too; a WebSocket with ``Origin: null``
        (a sandboxed or opaque page) is refused.
        """
        host_header = headers.get("host")
        if host_header is None:
            return "no Host header"
        if not self.allows(host_of_header(host_header)):
            return f"Host {host_header!r} is not an address of this dashboard"
        origin = headers.get("origin")
        if origin is not None and (origin.strip() != "null" or websocket) and not self.allows(host_of_origin(origin)):
            return f"Origin {origin!r} is not an address of this dashboard"
        return None

    def to_environ(self) -> dict[str, str]:
        """Environment entries that make :meth:`from_environ` rebuild this policy in the server process."""
        bind = "0.0.0.0" if self.wildcard else ""  # noqa: S104 - only when the user asked for every interface
        return {BIND_ENV: bind, ALLOWED_ENV: json.dumps(sorted(self.names))}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HostPolicy:
        """The policy ``robustlens serve`` passed in the environment; loopback only when none was passed."""
        environ = os.environ if environ is None else environ
        try:
            allowed = json.loads(environ.get(ALLOWED_ENV) or "[]")
        except json.JSONDecodeError:
            allowed = None
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            LOGGER.error("%s is not a JSON list of host names; only loopback names are allowed", ALLOWED_ENV)
            allowed = []
        return cls(environ.get(BIND_ENV) or "127.0.0.1", allowed)


class HostGuard:
    """ASGI middleware: refuse (403) HTTP requests and WebSocket handshakes that :class:`HostPolicy` refuses.

    ``policy`` defaults to :meth:`HostPolicy.from_environ`. Lifespan and other scopes pass through.
    """

    def __init__(self, app, policy: HostPolicy | None = None):
        self.app = app
        self.policy = policy or HostPolicy.from_environ()

    async def __call__(self, scope, receive, send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope.get("headers") or []:
            key = name.decode("latin-1").lower()
            if key in ("host", "origin") and key in headers:
                headers[key] = "\x00duplicate"  # two Host headers: refuse rather than guess which one counts
            else:
                headers[key] = value.decode("latin-1")
        reason = self.policy.refusal(headers, websocket=kind == "websocket")
        if reason is None:
            await self.app(scope, receive, send)
            return
        LOGGER.warning("refused %s %s: %s", kind, scope.get("path", ""), reason)
        if kind == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(REFUSAL)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": REFUSAL})
