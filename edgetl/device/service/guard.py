"""What keeps other web pages away from the service (ASGI middleware, before any handler runs).

* ``Host`` must name this service: an IP address it listens on (any, when bound to every
  interface), ``localhost`` when it listens there, this machine's own name (and ``.local``), or a
  name given with ``--allowed-host``. A page that rebinds its own domain to the Pi's address
  (DNS rebinding) sends its domain as ``Host`` and is refused.
* A request that changes anything (POST, PATCH, PUT, DELETE) from a browser page of another
  origin is refused: a foreign ``Origin``, or ``Sec-Fetch-Site: cross-site``/``same-site``.
  Clients that are not browsers (curl, scripts) send neither and are not affected.
* JSON endpoints take only ``Content-Type: application/json`` (a form or text/plain body, which
  a page of another origin could send without asking, is refused).
* Every body is bounded while it streams, whatever ``Content-Length`` says (chunked bodies too):
  an upload by the upload limits, a page's synced state by ``SYNC_BYTES``, any other body by
  ``SMALL_BYTES``; a body that stalls for ``STALL_S`` seconds is dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from starlette.responses import JSONResponse

from ...labels import printable
from .state import HTTPProblem, Limits

CHANGES = {"POST", "PATCH", "PUT", "DELETE"}
SMALL_BYTES = 64 * 1024
SYNC_BYTES = 64 * 1024 * 1024  # a page's features: about 7 KB a photo
STALL_S = 30.0
JSON_ROUTES = (("PATCH", "/api/labels/"), ("POST", "/api/rollback"), ("POST", "/api/sync"))
WILDCARDS = ("0.0.0.0", "::", "")


def _ip(text: str) -> ipaddress._BaseAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def split_host(value: str) -> tuple[str, str | None]:
    """``Host`` header value -> (host, port)."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8080
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    return (host, port) if sep and port.isdigit() and ":" not in host else (value, None)


class HostPolicy:
    def __init__(self, bind: str = "127.0.0.1", allowed: tuple[str, ...] = ()):
        self.bind = bind
        names = {n.lower().rstrip(".") for n in allowed}
        if bind in WILDCARDS or bind in ("localhost",) or (_ip(bind) and _ip(bind).is_loopback):
            names.add("localhost")
        if bind in WILDCARDS:
            me = socket.gethostname().lower()
            names |= {me, f"{me}.local"}
        self.names = names

    def allows(self, host: str) -> bool:
        ip = _ip(host)
        if ip is not None:
            if self.bind in WILDCARDS:
                return True
            bound = _ip(self.bind)
            return ip == bound or (bound is not None and bound.is_loopback and ip.is_loopback)
        return host.rstrip(".") in self.names or host == self.bind.lower()

    def describe(self) -> str:
        where = "any of its IP addresses" if self.bind in WILDCARDS else self.bind
        return f"{where}" + (f" or {', '.join(sorted(self.names))}" if self.names else "")


def _refuse(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class RequestGuard:
    def __init__(self, app, policy: HostPolicy, limits: Limits):
        self.app, self.policy, self.limits = app, policy, limits

    def body_limit(self, method: str, path: str) -> int:
        if method == "POST" and path == "/api/samples":
            return self.limits.max_files * self.limits.max_file_bytes + SMALL_BYTES
        if method == "POST" and path == "/api/predict":
            return self.limits.max_file_bytes + SMALL_BYTES
        if method == "POST" and path == "/api/sync":
            return SYNC_BYTES
        return SMALL_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = self.check(scope["method"], scope["path"], headers)
        limit = self.body_limit(scope["method"], scope["path"])
        length = headers.get("content-length", "")
        if problem is None and length.isdigit() and int(length) > limit:
            problem = (413, f"the request body is {int(length)} bytes; {scope['path']} takes at most {limit}")
        if problem is not None:
            return await _refuse(*problem)(scope, receive, send)
        seen = 0

        async def bounded():  # counts what actually arrives, and gives up on a stalled body
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), STALL_S)
            except asyncio.TimeoutError:
                raise HTTPProblem(408, f"the request body stalled for {STALL_S:g} s; send it again") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPProblem(413, f"the request body passed {limit} bytes, the most {scope['path']} takes")
            return message

        return await self.app(scope, bounded, send)

    def check(self, method: str, path: str, headers: dict) -> tuple[int, str] | None:
        host_value = headers.get("host", "")
        host, port = split_host(host_value)
        if not self.policy.allows(host):
            return (421, f"Host {printable(host_value)!r} is not this service's name (it answers to "
                         f"{self.policy.describe()}); start it with --allowed-host {printable(host) or 'NAME'} if "
                         "that is your name for this device")
        if method in CHANGES:
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site", "").lower()
            if origin is not None and origin != "null":
                scheme_host = origin.split("://", 1)[-1].lower().rstrip("/")
                if scheme_host != host_value.lower():
                    return (403, f"refused: a page of {printable(origin)} may not change this device (only its own "
                                 "page may)")
            elif origin == "null" or site in ("cross-site", "same-site"):
                return (403, f"refused: a request from another site ({printable(origin or site)}) may not change "
                             "this device")
            for m, prefix in JSON_ROUTES:
                if method == m and path.startswith(prefix):
                    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
                    if ctype != "application/json":
                        return (415, f"{path} takes Content-Type: application/json; received "
                                     f"{printable(ctype) or 'none'!r}")
        return None
