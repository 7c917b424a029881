"""What stands between a browser and a training server (a code-execution surface):

- bound to 127.0.0.1 by default, and then only `Host: 127.0.0.1 | localhost | [::1]` is served (a DNS
  rebinding page gets nothing); any other bind address needs the token printed at start, checked on
  every request (`?token=` once, then an HttpOnly, SameSite=Strict cookie, or `Authorization: Bearer`);
- every state-changing request is a POST that must come from this origin (`Origin`, else
  `Sec-Fetch-Site`) and carry this process's CSRF token (form field `csrf` or header `X-CSRF-Token`),
  with a declared body of at most `MAX_BODY` bytes;
- names of runs and configs are plain names, resolved inside the runs root (no `..`, no symlink out).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from starlette.datastructures import URL, QueryParams
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

MAX_BODY = 1 << 20  # 1 MiB: a config, a prompt, a list of runs
COOKIE = "tuneforge_token"
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# scripts only from this server (none inline), frames only of its own pages, forms only to it
POLICY = (b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
          b"frame-ancestors 'self'; form-action 'self'")


class Refused(Exception):
    """A request the rules refuse: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Guard:
    """The rules of one server process: its token (None on a loopback bind) and its CSRF token."""

    token: str | None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @classmethod
    def for_host(cls, host: str) -> Guard:
        return cls(None if is_loopback(host) else secrets.token_urlsafe(24))

    def check_host(self, request: Request) -> None:
        if self.token is not None:
            return  # the token is the protection; the server is reachable under any name
        hostname = (request.url.hostname or "").strip("[]")
        if hostname not in LOOPBACK_NAMES:
            raise Refused(403, f"refused: Host {hostname!r} is not this machine's loopback name "
                               "(open http://127.0.0.1:PORT/)")

    def token_matches(self, given: str | None) -> bool:
        return self.token is None or (given is not None and hmac.compare_digest(given, self.token))

    def check_token(self, request: Request) -> None:
        if self.token is None:
            return
        bearer = request.headers.get("authorization", "")
        given = bearer[7:] if bearer.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        if not self.token_matches(given):
            raise Refused(401, "refused: this server needs the token printed when it started "
                               "(open the URL it printed, with ?token=...)")

    def check_post(self, request: Request) -> None:
        """Same origin and a bounded body; the CSRF token is checked with the body (`check_csrf`)."""
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise Refused(411, "refused: a POST must declare its Content-Length")
        if int(length) > MAX_BODY:
            raise Refused(413, f"refused: the request body is over {MAX_BODY // 1024} KiB")
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None:
            if origin != own:
                raise Refused(403, f"refused: a cross-site request (Origin {origin})")
        elif request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise Refused(403, "refused: a cross-site request (Sec-Fetch-Site)")

    def check_csrf(self, given: str | None) -> None:
        if not given or not hmac.compare_digest(given, self.csrf):
            raise Refused(403, "refused: missing or stale form token (reload the page: the server restarted)")


class GuardMiddleware:
    """ASGI middleware applying a `Guard` to every HTTP request before any route sees it."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        try:
            self.guard.check_host(request)
            given = request.query_params.get("token")
            if self.guard.token is not None and given is not None:
                if not self.guard.token_matches(given):
                    raise Refused(401, "refused: wrong token")
                response = RedirectResponse(_without_token(request.url), status_code=303)
                response.set_cookie(COOKIE, self.guard.token, httponly=True, samesite="strict")
                return await response(scope, receive, send)
            self.guard.check_token(request)
            if request.method not in ("GET", "HEAD"):
                if request.method != "POST":
                    raise Refused(405, "refused: only GET and POST are served")
                self.guard.check_post(request)
        except Refused as refused:
            return await PlainTextResponse(refused.reason, status_code=refused.status)(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]
                if not any(name.lower() == b"content-security-policy" for name, _ in headers):
                    headers.append((b"content-security-policy", POLICY))  # unless a route set a tighter one
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def _without_token(url: URL) -> str:
    query = [(k, v) for k, v in QueryParams(url.query).multi_items() if k != "token"]
    return url.path + (f"?{urlencode(query)}" if query else "")


def refuse(status: int, reason: str) -> Response:
    return PlainTextResponse(reason, status_code=status)


def inside(root: Path, relative: str, what: str = "run") -> Path:
    """`root/relative` for a slash-separated path of plain names, refused if it leaves `root` (through
    `..`, an absolute path or a symlink)."""
    parts = relative.split("/")
    if not relative or len(parts) > 8 or not all(NAME.fullmatch(part) and part != ".." for part in parts):
        raise Refused(404, f"no such {what}: {relative[:100]!r} (names are letters, digits, '.', '_', '-')")
    path = root.joinpath(*parts)
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise Refused(404, f"no such {what}: {relative!r} (it leads out of the runs folder)")
    return path


def plain_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name or "") or name.startswith("."):
        raise Refused(400, f"{what} {name[:60]!r}: use letters, digits, '.', '_' and '-' only (at most 100)")
    return name
