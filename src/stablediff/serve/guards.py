"""The HTTP-level protections of `stablediff serve`, as ASGI middleware and one uvicorn protocol; server.py wires them.

From the outside in, a request meets:
- `HostCheck` (DNS rebinding): the Host header must name this machine: localhost, an IP address, the --host name or
  one given with --allowed-hosts; anything else gets 400. A page on another site that rebinds its own name to
  127.0.0.1 still sends that name as Host, so it is refused. An IP address is always accepted: a rebinding needs a
  name the attacker controls, and a page whose URL holds an IP address is served by that address.
- CORS (starlette's, only for --cors-origin origins).
- `BasicAuth` (--api-auth) on every route.
- `PostGuard` (cross-site request forgery): a POST with an Origin header from another site is refused (403), and a
  POST body must be JSON (415 otherwise). A browser cannot send a JSON body across sites without a CORS preflight,
  which only --cors-origin origins pass, and it always sends Origin with a cross-site POST, so a bodiless one (how
  webuiapi calls /interrupt) is caught by that. Clients that are not browsers send no Origin.
- `BodyLimit`: bodies over the cap get 413 before they are read, and so do JSON bodies with over 100,000 values
  (parsing would multiply them in memory).
- `read_timeout_protocol`: uvicorn's h11 protocol with a deadline for reading a request (uvicorn 0.55 has none:
  its keep-alive timer starts only after a response, so a client that never finishes its headers holds its
  connection for ever). The headers must arrive within `timeout` seconds of the connection opening or the previous
  response, and a body may not pause longer than that; then the connection gets 408 (or is closed).

Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import http
import ipaddress

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = ("localhost",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def _refuse(scope, receive, send, status: int, message: str, headers: dict | None = None):
    kind = http.HTTPStatus(status).phrase.title().replace(" ", "")  # e.g. "UnsupportedMediaType"
    await JSONResponse({"error": kind, "detail": message}, status, headers=headers)(scope, receive, send)


def _shown(value: bytes) -> str:
    text = value.decode("latin-1")
    return repr(text if len(text) <= 80 else text[:77] + "...")


class HostCheck:
    """Answer only requests whose Host header names this machine (see the module docstring); 400 otherwise."""

    def __init__(self, app, allowed: tuple[str, ...] = ()):
        self.app = app
        self.allowed = {h.lower().rstrip(".") for h in (*LOOPBACK_NAMES, *allowed)}

    @staticmethod
    def host_name(header: str) -> str:
        """'example.com:7860' -> 'example.com', '[::1]:7860' -> '::1'; lower case, no final dot."""
        header = header.strip().lower()
        if header.startswith("["):
            return header[1:header.find("]")] if "]" in header else header
        if header.count(":") == 1:
            header = header.partition(":")[0]
        return header.rstrip(".")

    def allows(self, header: str) -> bool:
        name = self.host_name(header)
        if "*" in self.allowed or name in self.allowed:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = _header(scope, b"host")
            if host is not None and not self.allows(host.decode("latin-1")):
                message = (f"Host {_shown(host)} is not allowed: this server answers localhost, IP addresses and the "
                           "names given with --allowed-hosts (DNS-rebinding protection)")
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                return await _refuse(scope, receive, send, 400, message)
        return await self.app(scope, receive, send)


class PostGuard:
    """POST (and every method but GET, HEAD, OPTIONS): 403 for an Origin other than this server's own or a
    --cors-origin one; 415 for a body that is not application/json. A bodiless POST needs no Content-Type."""

    def __init__(self, app, cors_origins: tuple[str, ...] = ()):
        self.app, self.cors_origins = app, {o.rstrip("/").lower() for o in cors_origins}

    def _origin_ok(self, origin: bytes, host: bytes | None) -> bool:
        origin_text = origin.decode("latin-1").strip().rstrip("/").lower()
        if "*" in self.cors_origins or origin_text in self.cors_origins:
            return True
        scheme, sep, netloc = origin_text.partition("://")
        return bool(sep) and host is not None and netloc == host.decode("latin-1").strip().lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        origin = _header(scope, b"origin")
        if origin is not None and not self._origin_ok(origin, _header(scope, b"host")):
            return await _refuse(scope, receive, send, 403, f"cross-site request from Origin {_shown(origin)} "
                                 "refused (allow a site with --cors-origin)")
        length = _header(scope, b"content-length")
        has_body = _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != b"0")
        media_type = (_header(scope, b"content-type") or b"").partition(b";")[0].strip().lower()
        if has_body and media_type != b"application/json":
            shown = _shown(media_type) if media_type else "none"
            return await _refuse(scope, receive, send, 415, f"a {scope['method']} body must be JSON "
                                 f"(Content-Type: application/json), not {shown}")
        return await self.app(scope, receive, send)


class BasicAuth:
    """HTTP Basic auth on every request (API, web page, docs); user and password compared in constant time."""

    def __init__(self, app, credentials: str):
        user, _, password = credentials.partition(":")
        self.app, self.user, self.password = app, user.encode(), password.encode()

    def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        user_ok = hmac.compare_digest(user, self.user)  # both compared, so the time says nothing about which
        password_ok = hmac.compare_digest(password, self.password)
        return scheme.lower() == b"basic" and bool(sep) and user_ok and password_ok

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" or self._allowed(_header(scope, b"authorization") or b""):
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            await _refuse(scope, receive, send, 401, "incorrect or missing username and password (HTTP Basic auth)",
                          headers={"WWW-Authenticate": 'Basic realm="stablediff", charset="UTF-8"'})
        else:  # a websocket
            await send({"type": "websocket.close", "code": 1008})


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, by Content-Length before reading or while reading, and
    bodies with over `max_items` JSON containers and values (counted as the commas, '[' and '{' in it, strings
    included): parsing JSON multiplies its size in memory (45 MB of `[{},{},...]` makes 1.3 GB of Python dicts),
    while no real request has even a tenth of that many (a base64 image has no commas, a prompt is capped at
    20,000 characters). The body is then handed on from memory."""

    def __init__(self, app, limit: int, max_items: int = 100_000):
        self.app, self.limit, self.max_items = app, limit, max_items

    async def _too_big(self, scope, receive, send):
        size = f"{self.limit / 2**20:g} MB" if self.limit >= 2**20 else f"{self.limit} byte"
        await _refuse(scope, receive, send, 413, f"request body over the {size} limit")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _refuse(scope, receive, send, 400, f"bad Content-Length {length[:20]!r}")
            if int(length) > self.limit:
                return await self._too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        del chunks
        items = body.count(b",") + body.count(b"[") + body.count(b"{")
        if items > self.max_items:
            return await _refuse(scope, receive, send, 413, f"request body with {items:,} JSON values (commas and "
                                 f"brackets, in strings too) is over the limit of {self.max_items:,}")
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


# --- slow clients -------------------------------------------------------------------------------------------------

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class ReadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a read deadline (see the module docstring); `timeout` is set by a subclass."""

    timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:  # headers still coming: the deadline set when the request began stands
            if self._deadline is None:
                self._arm()
        elif state is h11.SEND_BODY:  # a body may pause at most `timeout` seconds
            self._arm()
        else:  # the request is in: the app runs, and uvicorn's keep-alive timer covers the time after the response
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers are due within `timeout` as well

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # between requests, or headers unfinished: 408 if part of a request came
            if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()
        elif state is h11.SEND_BODY:
            self.transport.close()  # the app's receive() then says http.disconnect


def read_timeout_protocol(timeout: float) -> type[H11Protocol]:
    """The uvicorn `http=` protocol class that enforces a `timeout`-second read deadline."""
    return type("ReadTimeoutH11", (ReadTimeoutH11,), {"timeout": float(timeout)})
