"""The API's handlers: plain functions of the request over the service's learner.

Each reads ``request.app.state.service``; whatever touches the learner runs on its thread
(:meth:`Service.call`). Uploads reach the learner as bytes (:class:`~edgetl.device.features.Photo`),
and every result comes back in the order of the uploads.
"""

from __future__ import annotations

import os
import platform
import time

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, Response

from ... import __version__, package_versions
from ...errors import DataError
from ...labels import printable
from ...preprocess import decoded_pixels
from ..features import Photo
from ..learner import MODES
from ..phone.sync import import_state, state_for_page
from .state import HTTPProblem, Limits, Service


def _svc(request) -> Service:
    return request.app.state.service


def _int(value: str, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise HTTPProblem(400, f"{what} must be a whole number; received {printable(str(value)[:40])!r}") from None
    if abs(n) >= 2**63:
        raise HTTPProblem(400, f"{what} {printable(str(value)[:40])} is out of range")
    return n


async def _json_body(request) -> dict:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise HTTPProblem(400, "expected a JSON object in the request body") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, f"expected a JSON object; received {type(body).__name__}")
    return body


async def _form(request, limits: Limits, max_files: int):
    """The multipart form, refused early when it is larger than the limits allow."""
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
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return await request.form(max_files=0, max_fields=16)  # (fields only: no photos in it)
        parser = _BoundedParts(request.headers, request.stream(), max_files=max_files, max_fields=16,
                               max_part_size=64 * 1024, max_file_size=limits.max_file_bytes)
        return await parser.parse()
    except (MultiPartException, HTTPException) as exc:  # Starlette turns the first into the second
        text = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        if "Too many files" in text:
            raise HTTPProblem(413, f"at most {max_files} photo(s) per request; send the rest in another") from None
        raise HTTPProblem(400, f"bad multipart upload: {text}") from None


class _BoundedParts(MultiPartParser):
    """Starlette's multipart parser, keeping at most ``max_file_size + 1`` bytes of each file as
    it streams: an oversized photo costs no more disk than that, and still gets its own error
    (the others of the request are stored)."""

    def __init__(self, *args, max_file_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_file_size = max_file_size
        self._kept: dict[int, int] = {}

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is not None:
            kept = self._kept.get(id(part), 0)
            end = min(end, start + max(0, self.max_file_size + 1 - kept))
            self._kept[id(part)] = kept + (end - start)
            if end <= start:
                return
        super().on_part_data(data, start, end)


async def _photos(uploads, limits: Limits, size: int) -> list[Photo | dict]:
    """Each upload as a :class:`Photo`, or ``{file, error, status}`` when it is empty, too large,
    or past the request's decode budget (pixels read from the headers, before any decoding)."""
    out: list[Photo | dict] = []
    spent = 0
    for i, up in enumerate(uploads):
        name = printable(os.path.basename(up.filename or "") or f"upload-{i + 1}")
        data = await up.read(limits.max_file_bytes + 1)
        if len(data) > limits.max_file_bytes:
            out.append({"file": name, "error": f"larger than the limit of {limits.max_file_bytes} bytes",
                        "status": 413})
        elif not data:
            out.append({"file": name, "error": "empty file; expected a photo (JPEG, PNG, ...)", "status": 400})
        elif spent + (cost := decoded_pixels(data, size)) > limits.max_request_pixels:
            out.append({"file": name, "status": 413,
                        "error": f"{cost / 1e6:.1f} MP to decode, past this request's budget of "
                                 f"{limits.max_request_pixels / 1e6:g} MP ({spent / 1e6:.1f} MP already taken by the "
                                 "photos before it); send it in another request, or smaller"})
        else:
            spent += cost
            out.append(Photo(name, data))
    return out


def _versions(runner_backend: str) -> dict:
    import numpy


    return {"edgetl": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            **package_versions(("ai-edge-litert", "onnxruntime", "scipy", "starlette", "uvicorn")),
            "runtime": runner_backend}


async def _known_label(svc: Service, label: str) -> None:
    known = await svc.call(lambda: set(svc.learner.labels()) | set(svc.learner.store.counts()))
    if label not in known:
        raise HTTPProblem(404, f"unknown label {printable(label)!r}; known: {sorted(known)}")


def _check_label_size(value: str, what: str, limits: Limits) -> None:
    if len(value) > limits.max_label_chars:
        raise HTTPProblem(400, f"{what} is {len(value)} characters; at most {limits.max_label_chars}")


async def info(request):
    svc = _svc(request)

    def get():
        d = svc.learner.info()
        d["name"] = svc.learner.bundle.manifest.get("name")
        d["versions"] = _versions(d["backend"])
        d["limits"] = {"max_file_bytes": svc.limits.max_file_bytes, "max_files": svc.limits.max_files}
        d["training"] = next((j.doc() for j in svc.jobs.values() if j.state in ("queued", "running")), None)
        return d

    return JSONResponse(await svc.call(get))


async def add_samples(request):
    svc = _svc(request)
    form = await _form(request, svc.limits, svc.limits.max_files)
    label = form.get("label")
    if not isinstance(label, str) or not label.strip():
        raise HTTPProblem(400, "missing the form field 'label' (the class of the photos)")
    _check_label_size(label, "label", svc.limits)
    uploads = [u for u in form.getlist("files") + form.getlist("file") if not isinstance(u, str)]
    if not uploads:
        raise HTTPProblem(400, "no photos: send them as multipart file field(s) 'files'")
    new_class = form.get("new_class") in ("1", "true", "yes")
    items = await _photos(uploads, svc.limits, svc.learner.bundle.preprocessing.size)
    photos = [p for p in items if isinstance(p, Photo)]
    stored = []
    if photos:
        stored = await svc.call(svc.learner.add_photos, photos, label, thumbnails=True, new_class=new_class)
        label = label.strip()
    results = iter(stored)
    files = []
    for item in items:
        r = next(results) if isinstance(item, Photo) else item
        if r.get("duplicate"):
            r = {"file": r["file"], "duplicate": True, "note": f"already stored as {label!r}; not stored twice"}
        files.append({k: v for k, v in r.items() if k != "status"})
    failed = [f for f in files if "error" in f]
    counts = await svc.call(svc.learner.store.counts)
    doc = {"label": label, "stored": sum(1 for f in files if "id" in f), "files": files, "samples": counts}
    if not failed:
        return JSONResponse(doc, status_code=201)
    if len(failed) < len(files):
        return JSONResponse(doc, status_code=200)
    too_big = all(isinstance(i, dict) and i["status"] == 413 for i in items)
    first = failed[0]["error"] if failed[0]["error"].startswith(f"{failed[0]['file']}:") else \
        f"{failed[0]['file']}: {failed[0]['error']}"
    doc["error"] = f"no photo stored: {first}" + (
        f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
    return JSONResponse(doc, status_code=413 if too_big else 400)


async def list_samples(request):
    svc = _svc(request)
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
    svc = _svc(request)
    sid = _int(request.path_params["sid"], "sample id")
    data = await svc.call(svc.learner.store.thumb, sid)
    if data is None:
        raise HTTPProblem(404, f"no thumbnail for sample {sid} (no such sample, or stored without one)")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


async def delete_sample(request):
    svc = _svc(request)
    sid = _int(request.path_params["sid"], "sample id")
    try:
        return JSONResponse(await svc.call(svc.learner.remove_sample, sid))
    except DataError as exc:
        raise HTTPProblem(404, str(exc)) from None


async def delete_label(request):
    svc = _svc(request)
    label = request.path_params["label"]
    await _known_label(svc, label)
    return JSONResponse(await svc.call(svc.learner.remove, label))


async def rename_label(request):
    svc = _svc(request)
    label = request.path_params["label"]
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise HTTPProblem(400, "expected {\"name\": \"<new name>\"}")
    _check_label_size(name, "name", svc.limits)
    await _known_label(svc, label)
    return JSONResponse(await svc.call(svc.learner.rename, label, name))


async def train(request):
    job = _svc(request).start_training()
    return JSONResponse(job.doc(), status_code=202, headers={"Location": f"/api/jobs/{job.id}"})


async def job(request):
    j = _svc(request).jobs.get(request.path_params["jid"])
    if j is None:
        raise HTTPProblem(404, f"no job {printable(request.path_params['jid'])!r} (jobs are kept until the "
                               "service restarts, the last 20)")
    return JSONResponse(j.doc())


def _predict_options(params) -> tuple[str, float | None, int]:
    mode = params.get("mode", "auto")
    if mode not in MODES:
        raise HTTPProblem(400, f"mode must be one of {', '.join(map(repr, MODES))}; received {printable(mode)!r}")
    unknown_below = params.get("unknown_below")
    if unknown_below is not None:
        try:
            unknown_below = float(unknown_below)
        except ValueError:
            raise HTTPProblem(400, f"unknown_below must be a number in [0, 1]; received "
                                   f"{printable(unknown_below)!r}") from None
        if not 0.0 <= unknown_below <= 1.0:
            raise HTTPProblem(400, f"unknown_below must be a number in [0, 1]; received {unknown_below}")
    top = _int(params.get("top", "3"), "top")
    if not 1 <= top <= 20:
        raise HTTPProblem(400, f"top must be 1..20; received {top}")
    return mode, unknown_below, top


async def predict(request):
    svc = _svc(request)
    mode, unknown_below, top = _predict_options(request.query_params)
    form = await _form(request, svc.limits, 1)
    uploads = [u for u in form.getlist("file") + form.getlist("files") if not isinstance(u, str)]
    if len(uploads) != 1:
        raise HTTPProblem(400, f"expected one photo in the multipart field 'file'; received {len(uploads)}")
    photo = (await _photos(uploads, svc.limits, svc.learner.bundle.preprocessing.size))[0]
    if not isinstance(photo, Photo):
        raise HTTPProblem(photo["status"], f"{photo['file']}: {photo['error']}")
    t0 = time.perf_counter()
    r = await svc.call(svc.learner.predict, [photo], top_k=top, mode=mode, unknown_below=unknown_below)
    ms = (time.perf_counter() - t0) * 1000
    p = r["predictions"][0]
    if "error" in p:
        raise HTTPProblem(400, p["error"])
    return JSONResponse({"file": photo.name, "label": p["label"], "score": p["score"], "top": p["top"],
                         "unknown": bool(p.get("unknown")), "version": r["head_version"], "mode": r["mode"],
                         "mode_reason": r.get("mode_reason"), "ms": round(ms, 2)})


async def history(request):
    svc = _svc(request)

    def get():
        rows = svc.learner.history()
        for r in rows:  # the misclassified lists belong to /api/metrics
            r["info"].get("heldout", {}).pop("misclassified", None)
        return {"active": svc.learner.store.active_version(), "versions": rows}

    return JSONResponse(await svc.call(get))


async def rollback(request):
    svc = _svc(request)
    body = await _json_body(request)
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise HTTPProblem(400, f"expected {{\"version\": N}} with a whole number; received {version!r}")
    versions = await svc.call(lambda: [h["version"] for h in svc.learner.history()])
    if version not in versions:
        raise HTTPProblem(404, f"no head version {version}; versions: {versions}")
    return JSONResponse(await svc.call(svc.learner.rollback, version))


async def sync_get(request):
    svc = _svc(request)
    return JSONResponse(await svc.call(state_for_page, svc.learner))


async def sync_post(request):
    svc = _svc(request)
    body = await _json_body(request)  # (bounded by the guard while it streams)
    return JSONResponse(await svc.call(import_state, svc.learner, body))


async def metrics(request):
    svc = _svc(request)
    return JSONResponse(await svc.call(svc.learner.metrics))
