"""The device as a service: an HTTP API and a web page (``edgetl device serve``).

A Starlette app served by uvicorn. One thread owns the :class:`Learner` (its backbone and its
store connection); every request that needs it runs there, one at a time, so the backbone
stays loaded and SQLite sees one writer. A training job runs in a thread of its own on its own
store connection (training never runs the backbone), so predictions and uploads go on while
it trains; the store's generation guard keeps a training from undoing a delete or a rollback
that was acknowledged while it ran.

Errors are JSON ``{"error": "..."}`` with a 4xx code; a 500 says only which kind of error it
was (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import platform
import secrets
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, DataError, EdgetlError, StoreError
from ..head.fit import HeadTrainConfig
from ..labels import printable
from .learner import MODES

log = logging.getLogger("edgetl")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
HOLDOUT_EVERY = 4  # each training first measures a head without every 4th stored photo of each class


@dataclass(frozen=True)
class Limits:
    """What one request may carry. Photos are also bounded in pixels by the decoder
    (``EDGETL_MAX_PIXELS``, 40 MP by default)."""

    max_file_bytes: int = 20 * 1024 * 1024
    max_files: int = 64
    max_label_chars: int = 100

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + 64 * 1024


class Abandoned(EdgetlError):
    """A training job given up (the service is stopping); nothing was saved."""


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass
class Job:
    id: str
    state: str = "queued"  # queued -> running -> done | failed
    progress: float = 0.0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict | None = None
    error: str | None = None

    def doc(self) -> dict:
        d = {"id": self.id, "state": self.state, "progress": round(self.progress, 3), "created": self.created,
             "started": self.started, "finished": self.finished}
        if self.result is not None:
            d["result"] = self.result
        if self.error is not None:
            d["error"] = self.error
        return d


def _job_result(r: dict) -> dict:
    """What a finished training reports: the new version and its accuracy figures."""
    keep = ("version", "labels", "new_classes", "dropped_classes", "num_samples", "stored", "replay",
            "train_accuracy", "final_loss", "seconds", "heldout", "new_class_bias", "activated", "candidate")
    return {k: r[k] for k in keep if k in r}


class Service:
    """The state behind the app: the learner's thread, the training job, the limits and token."""

    def __init__(self, open_learner, token: str | None = None, limits: Limits | None = None,
                 train_config: HeadTrainConfig | None = None, holdout_every: int | None = HOLDOUT_EVERY,
                 grace_s: float = 5.0):
        self._open_learner = open_learner
        self.token = token
        self.limits = limits or Limits()
        self.train_config = train_config
        self.holdout_every = holdout_every
        self.grace_s = grace_s
        self.learner = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-learner")
        self.jobs: dict[str, Job] = {}
        self._job_lock = threading.Lock()
        self._job_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- life -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.learner = await self.call(self._open_learner)

    async def stop(self) -> None:
        """Let a running training finish for ``grace_s``, then abandon it (nothing is saved)."""
        t = self._job_thread
        if t is not None and t.is_alive():
            log.info("waiting up to %.0f s for the training job to finish", self.grace_s)
            await asyncio.get_running_loop().run_in_executor(None, t.join, self.grace_s)
            if t.is_alive():
                log.warning("abandoning the training job: the service is stopping; nothing is saved")
                self._stopping.set()
                await asyncio.get_running_loop().run_in_executor(None, t.join)
        if self.learner is not None:
            await self.call(self.learner.close)
            self.learner = None
        self._pool.shutdown(wait=True)

    async def call(self, fn, *args, **kwargs):
        """Run ``fn`` on the learner's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    # -- training -------------------------------------------------------------------------------
    def start_training(self) -> Job:
        with self._job_lock:
            running = next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)
            if running is not None:
                raise HTTPProblem(409, f"a training is already {running.state} (job {running.id}); "
                                       "wait for it: GET /api/jobs/" + running.id)
            if self._stopping.is_set():
                raise HTTPProblem(503, "the service is stopping")
            job = Job(id=uuid.uuid4().hex[:12])
            self.jobs[job.id] = job
            for old in sorted(self.jobs.values(), key=lambda j: j.created)[:-20]:  # keep the last 20
                del self.jobs[old.id]
            self._job_thread = threading.Thread(target=self._train, args=(job,), name="edgetl-train", daemon=True)
            self._job_thread.start()
            return job

    def _train(self, job: Job) -> None:
        job.state, job.started = "running", time.time()

        def progress(fraction: float) -> None:
            if self._stopping.is_set():
                raise Abandoned("abandoned: the service stopped during the training; nothing was saved, "
                                "train again")
            job.progress = max(job.progress, min(1.0, float(fraction)))

        worker = None
        try:
            worker = self.learner.worker()
            r = worker.train(self.train_config, progress=progress, holdout_every=self.holdout_every)
            job.result, job.state, job.progress = _job_result(r), "done", 1.0
        except EdgetlError as exc:
            job.error, job.state = str(exc), "failed"
        except Exception as exc:  # noqa: BLE001 - a job never takes the service down
            log.exception("training job %s failed", job.id)
            job.error, job.state = f"internal error ({type(exc).__name__}); see the service's log", "failed"
        finally:
            if worker is not None:
                worker.close()
            job.finished = time.time()


# -- helpers for the endpoints ----------------------------------------------------------------------
def _error(status: int, message: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HTTPProblem(400, f"{what} must be a whole number; received {printable(str(value))!r}") from None


async def _json_body(request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPProblem(400, "expected a JSON object in the request body") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, f"expected a JSON object; received {type(body).__name__}")
    return body


async def _form(request, limits: Limits, max_files: int):
    """The multipart form, refused early when it is larger than the limits allow."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    length = request.headers.get("content-length")
    if length is None:
        raise HTTPProblem(411, "send the upload with a Content-Length header")
    if _int(length, "Content-Length") > max_files * limits.max_file_bytes + 64 * 1024:
        raise HTTPProblem(413, f"the upload is {int(length)} bytes; at most {max_files} photo(s) of "
                               f"{limits.max_file_bytes} bytes each are accepted per request")
    if not request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                               "application/x-www-form-urlencoded")):
        raise HTTPProblem(400, "expected multipart/form-data with the photo(s) in 'files' (or 'file')")
    try:
        return await request.form(max_files=max_files, max_fields=16, max_part_size=64 * 1024)
    except (MultiPartException, HTTPException) as exc:  # Starlette turns the first into the second
        text = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        if "Too many files" in text:
            raise HTTPProblem(413, f"at most {max_files} photo(s) per request; send the rest in another") from None
        raise HTTPProblem(400, f"bad multipart upload: {text}") from None


async def _spool(uploads, limits: Limits, folder: str) -> tuple[list[str], list[str], list[dict]]:
    """Write the uploads to ``folder``; returns their paths, their names and per-file errors."""
    paths, names, errors = [], [], []
    for i, up in enumerate(uploads):
        name = printable(os.path.basename(up.filename or "") or f"upload-{i + 1}")
        data = await up.read(limits.max_file_bytes + 1)
        if len(data) > limits.max_file_bytes:
            errors.append({"file": name, "error": f"larger than the limit of {limits.max_file_bytes} bytes",
                           "status": 413})
            continue
        if not data:
            errors.append({"file": name, "error": "empty file; expected a photo (JPEG, PNG, ...)", "status": 400})
            continue
        path = os.path.join(folder, f"{i:04d}")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
        names.append(name)
    return paths, names, errors


def _versions(runner_backend: str) -> dict:
    import numpy

    from .. import __version__, package_versions

    return {"edgetl": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            **package_versions(("ai-edge-litert", "onnxruntime", "scipy", "starlette", "uvicorn")),
            "runtime": runner_backend}


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


def web_root() -> Path:
    return Path(str(resources.files("edgetl.device") / "web"))


def create_app(open_learner, token: str | None = None, limits: Limits | None = None,
               train_config: HeadTrainConfig | None = None, holdout_every: int | None = HOLDOUT_EVERY,
               grace_s: float = 5.0, on_stop=None):
    """The ASGI app. ``open_learner()`` runs on the learner's thread at start-up; ``on_stop()``
    after the shutdown has closed the store."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    svc = Service(open_learner, token=token, limits=limits, train_config=train_config,
                  holdout_every=holdout_every, grace_s=grace_s)
    L = svc.limits

    async def info(request):
        def get():
            d = svc.learner.info()
            d["name"] = svc.learner.bundle.manifest.get("name")
            d["versions"] = _versions(d["backend"])
            d["limits"] = {"max_file_bytes": L.max_file_bytes, "max_files": L.max_files}
            d["training"] = next((j.doc() for j in svc.jobs.values() if j.state in ("queued", "running")), None)
            return d

        return JSONResponse(await svc.call(get))

    async def add_samples(request):
        form = await _form(request, L, L.max_files)
        label = form.get("label")
        if not isinstance(label, str) or not label.strip():
            raise HTTPProblem(400, "missing the form field 'label' (the class of the photos)")
        if len(label) > L.max_label_chars:
            raise HTTPProblem(400, f"label is {len(label)} characters; at most {L.max_label_chars}")
        uploads = [u for u in form.getlist("files") + form.getlist("file") if not isinstance(u, str)]
        if not uploads:
            raise HTTPProblem(400, "no photos: send them as multipart file field(s) 'files'")
        new_class = form.get("new_class") in ("1", "true", "yes")
        with tempfile.TemporaryDirectory(prefix="edgetl-upload-") as tmp:
            paths, names, too_big = await _spool(uploads, L, tmp)
            result = {"label": label, "stored": 0, "ids": [], "files": [], "duplicates": [], "errors": []}
            if paths:
                result = await svc.call(svc.learner.add, paths, label, sources=names, thumbnails=True,
                                        new_class=new_class)
            for e in result["errors"]:
                e["error"] = e["error"].replace(tmp + os.sep, "")
        by_name = {}
        for i, f in zip(result["ids"], result["files"]):
            by_name.setdefault(f, []).append({"file": f, "id": i})
        files = []
        errors = {e["file"]: e for e in too_big + result["errors"]}
        dups = list(result["duplicates"])
        for name in [printable(os.path.basename(u.filename or "") or f"upload-{k + 1}") for k, u in enumerate(uploads)]:
            if by_name.get(name):
                files.append(by_name[name].pop(0))
            elif name in dups:
                dups.remove(name)
                files.append({"file": name, "duplicate": True,
                              "note": f"already stored as {result['label']!r}; not stored twice"})
            else:
                e = errors.get(name, {"error": "not processed"})
                files.append({"file": name, "error": e["error"]})
        failed = [f for f in files if "error" in f]
        counts = await svc.call(svc.learner.store.counts)
        doc = {"label": result["label"], "stored": result["stored"], "files": files, "samples": counts}
        if not failed:
            return JSONResponse(doc, status_code=201)
        if len(failed) < len(files):
            return JSONResponse(doc, status_code=200)
        status = 413 if all(e.get("status") == 413 for e in too_big) and len(too_big) == len(files) else 400
        doc["error"] = f"no photo stored: {failed[0]['file']}: {failed[0]['error']}" + (
            f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
        return JSONResponse(doc, status_code=status)

    async def list_samples(request):
        label = request.query_params.get("label")
        limit = _int(request.query_params.get("limit", "200"), "limit")
        offset = _int(request.query_params.get("offset", "0"), "offset")
        if not 0 < limit <= 1000 or offset < 0:
            raise HTTPProblem(400, f"limit must be 1..1000 and offset >= 0; received {limit}, {offset}")

        def get():
            rows = svc.learner.store.listing(label, limit=limit, offset=offset)
            for r in rows:
                r["thumb"] = f"/api/samples/{r['id']}/thumb"
            return {"samples": rows, "counts": svc.learner.store.counts()}

        return JSONResponse(await svc.call(get))

    async def thumb(request):
        sid = _int(request.path_params["sid"], "sample id")
        data = await svc.call(svc.learner.store.thumb, sid)
        if data is None:
            raise HTTPProblem(404, f"no thumbnail for sample {sid} (no such sample, or stored without one)")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    async def delete_sample(request):
        sid = _int(request.path_params["sid"], "sample id")
        try:
            return JSONResponse(await svc.call(svc.learner.remove_sample, sid))
        except DataError as exc:
            raise HTTPProblem(404, str(exc)) from None

    async def delete_label(request):
        label = request.path_params["label"]
        known = await svc.call(lambda: set(svc.learner.labels()) | set(svc.learner.store.counts()))
        if label not in known:
            raise HTTPProblem(404, f"unknown label {printable(label)!r}; known: {sorted(known)}")
        return JSONResponse(await svc.call(svc.learner.remove, label))

    async def rename_label(request):
        label = request.path_params["label"]
        body = await _json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise HTTPProblem(400, "expected {\"name\": \"<new name>\"}")
        if len(name) > L.max_label_chars:
            raise HTTPProblem(400, f"name is {len(name)} characters; at most {L.max_label_chars}")
        known = await svc.call(lambda: set(svc.learner.labels()) | set(svc.learner.store.counts()))
        if label not in known:
            raise HTTPProblem(404, f"unknown label {printable(label)!r}; known: {sorted(known)}")
        return JSONResponse(await svc.call(svc.learner.rename, label, name))

    async def train(request):
        job = svc.start_training()
        return JSONResponse(job.doc(), status_code=202, headers={"Location": f"/api/jobs/{job.id}"})

    async def job(request):
        j = svc.jobs.get(request.path_params["jid"])
        if j is None:
            raise HTTPProblem(404, f"no job {printable(request.path_params['jid'])!r} (jobs are kept until the "
                                   "service restarts, the last 20)")
        return JSONResponse(j.doc())

    async def predict(request):
        mode = request.query_params.get("mode", "auto")
        if mode not in MODES:
            raise HTTPProblem(400, f"mode must be one of {', '.join(map(repr, MODES))}; received {printable(mode)!r}")
        unknown_below = request.query_params.get("unknown_below")
        if unknown_below is not None:
            try:
                unknown_below = float(unknown_below)
            except ValueError:
                raise HTTPProblem(400, f"unknown_below must be a number in [0, 1]; received "
                                       f"{printable(unknown_below)!r}") from None
            if not 0.0 <= unknown_below <= 1.0:
                raise HTTPProblem(400, f"unknown_below must be a number in [0, 1]; received {unknown_below}")
        top = _int(request.query_params.get("top", "3"), "top")
        if not 1 <= top <= 20:
            raise HTTPProblem(400, f"top must be 1..20; received {top}")
        form = await _form(request, L, 1)
        uploads = [u for u in form.getlist("file") + form.getlist("files") if not isinstance(u, str)]
        if len(uploads) != 1:
            raise HTTPProblem(400, f"expected one photo in the multipart field 'file'; received {len(uploads)}")
        with tempfile.TemporaryDirectory(prefix="edgetl-predict-") as tmp:
            paths, names, errors = await _spool(uploads, L, tmp)
            if errors:
                raise HTTPProblem(errors[0]["status"], f"{errors[0]['file']}: {errors[0]['error']}")
            t0 = time.perf_counter()
            r = await svc.call(svc.learner.predict, paths, top_k=top, mode=mode, unknown_below=unknown_below)
            ms = (time.perf_counter() - t0) * 1000
        p = r["predictions"][0]
        if "error" in p:
            raise HTTPProblem(400, f"{names[0]}: {p['error'].replace(tmp + os.sep, '')}")
        return JSONResponse({"file": names[0], "label": p["label"], "score": p["score"], "top": p["top"],
                             "unknown": bool(p.get("unknown")), "version": r["head_version"], "mode": r["mode"],
                             "mode_reason": r.get("mode_reason"), "ms": round(ms, 2)})

    async def history(request):
        def get():
            rows = svc.learner.history()
            for r in rows:  # the misclassified lists belong to /api/metrics
                r["info"].get("heldout", {}).pop("misclassified", None)
            return {"active": svc.learner.store.active_version(), "versions": rows}

        return JSONResponse(await svc.call(get))

    async def rollback(request):
        body = await _json_body(request)
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise HTTPProblem(400, f"expected {{\"version\": N}} with a whole number; received {version!r}")
        versions = await svc.call(lambda: [h["version"] for h in svc.learner.history()])
        if version not in versions:
            raise HTTPProblem(404, f"no head version {version}; versions: {versions}")
        return JSONResponse(await svc.call(svc.learner.rollback, version))

    async def metrics(request):
        return JSONResponse(await svc.call(svc.learner.metrics))

    async def index(request):
        return FileResponse(web_root() / "index.html", headers={"Cache-Control": "no-cache"})

    async def problem(request, exc: HTTPProblem):
        return _error(exc.status, exc.message, exc.headers)

    async def edgetl_error(request, exc: EdgetlError):
        status = 409 if isinstance(exc, StoreError) else 400
        return _error(status, str(exc))

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            return _error(404, f"no such page: {request.method} {printable(request.url.path)}")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {printable(request.url.path)}")
        return _error(exc.status_code, str(exc.detail))

    async def crash(request, exc: Exception):
        log.exception("error while serving %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the service's log")

    @asynccontextmanager
    async def lifespan(app):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()
            if on_stop is not None:
                on_stop()

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/samples", add_samples, methods=["POST"]),
        Route("/api/samples", list_samples, methods=["GET"]),
        Route("/api/samples/{sid}/thumb", thumb),
        Route("/api/samples/{sid}", delete_sample, methods=["DELETE"]),
        Route("/api/labels/{label:path}", delete_label, methods=["DELETE"]),
        Route("/api/labels/{label:path}", rename_label, methods=["PATCH"]),
        Route("/api/train", train, methods=["POST"]),
        Route("/api/jobs/{jid}", job),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/history", history),
        Route("/api/rollback", rollback, methods=["POST"]),
        Route("/api/metrics", metrics),
        Mount("/static", StaticFiles(directory=web_root()), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(_TokenGate, token=token)],
                    exception_handlers={HTTPProblem: problem, EdgetlError: edgetl_error, HTTPException: http_error,
                                        Exception: crash})
    app.state.service = svc
    return app


def new_token() -> str:
    return secrets.token_urlsafe(16)


def check_binding(host: str, token: str | None) -> None:
    """Any address but this machine's own needs a token."""
    if host not in LOCAL_HOSTS and not token:
        raise ConfigError(f"serving on {host} makes the device reachable from the network: it needs a token "
                          "(--token, or leave it out to have one generated)")
