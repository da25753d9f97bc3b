"""The ASGI app of ``edgetl device serve``: the API's routes, the access token, the page.

Errors are JSON ``{"error": "..."}`` with a 4xx code; a 500 says only which kind of error it
was (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import hmac
import logging
import tempfile
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ...errors import EdgetlError, StoreError
from ...head.fit import HeadTrainConfig
from ...labels import printable
from ..phone import build_app
from . import handlers as h
from .guard import HostPolicy, RequestGuard
from .state import HOLDOUT_EVERY, HTTPProblem, Limits, Service

log = logging.getLogger("edgetl")


def web_root() -> Path:
    return Path(str(resources.files("edgetl.device.service") / "web"))


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _TokenGate:
    """ASGI middleware: every /api/ request carries ``Authorization: Bearer <token>``."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if self.token and scope["type"] == "http" and scope["path"].startswith("/api/"):
            given = ""
            for k, v in scope.get("headers", []):
                if k == b"authorization":
                    given = v.decode("latin-1")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                what = "a wrong token" if given else "no token"
                resp = _error(401, f"this device needs its access token (received {what}); send "
                                   "'Authorization: Bearer <token>', or enter it in the page",
                              headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def index(request):
    return FileResponse(web_root() / "index.html", headers={"Cache-Control": "no-cache"})


# The phone app: cross-origin isolated (LiteRT.js may then run threads), revalidated on every
# load (its service worker serves it offline).
PHONE_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                 "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
PHONE_TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".webmanifest": "application/manifest+json",
               ".json": "application/json", ".svg": "image/svg+xml"}


async def phone(request):
    svc = request.app.state.service
    root = svc.phone_dir
    if root is None:
        raise HTTPProblem(404, f"this service has no phone app: {svc.phone_error}")
    rel = request.path_params.get("path", "")
    if request.url.path == "/phone":
        return RedirectResponse("/phone/")
    path = (root / (rel or "index.html")).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise HTTPProblem(404, f"no such file in the phone app: {printable(rel)}")
    media = PHONE_TYPES.get(path.suffix)
    return FileResponse(path, media_type=media, headers=PHONE_HEADERS)


async def _problem(request, exc: HTTPProblem):
    return _error(exc.status, exc.message, exc.headers)


async def _edgetl_error(request, exc: EdgetlError):
    return _error(409 if isinstance(exc, StoreError) else 400, str(exc))


async def _http_error(request, exc: HTTPException):
    if exc.status_code == 404:
        return _error(404, f"no such page: {request.method} {printable(request.url.path)}")
    if exc.status_code == 405:
        return _error(405, f"{request.method} is not allowed on {printable(request.url.path)}")
    return _error(exc.status_code, str(exc.detail))


async def _crash(request, exc: Exception):
    log.exception("error while serving %s %s", request.method, request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}); see the service's log")


ROUTES = [
    Route("/", index),
    Route("/api/info", h.info),
    Route("/api/samples", h.add_samples, methods=["POST"]),
    Route("/api/samples", h.list_samples, methods=["GET"]),
    Route("/api/samples/{sid}/thumb", h.thumb),
    Route("/api/samples/{sid}", h.delete_sample, methods=["DELETE"]),
    Route("/api/labels/{label:path}", h.delete_label, methods=["DELETE"]),
    Route("/api/labels/{label:path}", h.rename_label, methods=["PATCH"]),
    Route("/api/train", h.train, methods=["POST"]),
    Route("/api/jobs/{jid}", h.job),
    Route("/api/predict", h.predict, methods=["POST"]),
    Route("/api/history", h.history),
    Route("/api/rollback", h.rollback, methods=["POST"]),
    Route("/api/metrics", h.metrics),
    Route("/api/sync", h.sync_get, methods=["GET"]),
    Route("/api/sync", h.sync_post, methods=["POST"]),
    Route("/phone", phone),
    Route("/phone/{path:path}", phone),
]


def _phone_app(learner, out: Path) -> str:
    return build_app(learner.bundle, out)["app"]


def create_app(open_learner, token: str | None = None, limits: Limits | None = None,
               train_config: HeadTrainConfig | None = None, holdout_every: int | None = HOLDOUT_EVERY,
               grace_s: float = 5.0, on_stop=None, bind: str = "127.0.0.1",
               allowed_hosts: tuple[str, ...] = ()) -> Starlette:
    """The ASGI app. ``open_learner()`` runs on the learner's thread at start-up; ``on_stop()``
    after the shutdown has closed the store. ``bind``: the address the server listens on;
    ``allowed_hosts``: more names it answers to (see :mod:`.guard`)."""
    svc = Service(open_learner, token=token, limits=limits, train_config=train_config,
                  holdout_every=holdout_every, grace_s=grace_s)
    guard = Middleware(RequestGuard, policy=HostPolicy(bind, allowed_hosts), limits=svc.limits)

    @asynccontextmanager
    async def lifespan(app):
        await svc.start()
        with tempfile.TemporaryDirectory(prefix="edgetl-phone-") as tmp:
            try:
                svc.phone_dir = Path(await svc.call(_phone_app, svc.learner, Path(tmp) / "app"))
            except EdgetlError as exc:
                svc.phone_error = str(exc)
                log.warning("no phone app at /phone/: %s", exc)
            try:
                yield
            finally:
                await svc.stop()
                if on_stop is not None:
                    on_stop()

    app = Starlette(routes=[*ROUTES, Mount("/static", StaticFiles(directory=web_root()), name="static")],
                    lifespan=lifespan, middleware=[guard, Middleware(_TokenGate, token=token)],
                    exception_handlers={HTTPProblem: _problem, EdgetlError: _edgetl_error,
                                        HTTPException: _http_error, Exception: _crash})
    app.state.service = svc
    return app
