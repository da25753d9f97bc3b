"""Try, against a live `edgetl device serve`, what another web page or a hostile client would, and
print whether each was refused. Nothing here leaves this machine (127.0.0.1 only).

    python benchmarks/attack.py --bundle models/flowers_v3          # starts its own service
    python benchmarks/attack.py --url http://127.0.0.1:8080 [--token T]  # one already running

Exits 1 if anything was accepted that should not have been.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table  # noqa: E402


def request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, str]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        headers = {"Host": u.netloc, **(headers or {})}
        if body:
            headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def multipart(label: str, name: str, data: bytes) -> tuple[bytes, str]:
    b = "edgetl-attack-boundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\n{label}\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def cases(url: str, token: str | None) -> list[tuple[str, int, str]]:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    form, ctype = multipart("owned", "holiday.jpg", eps)
    out = []

    def run(name, method, path, body=b"", headers=None):
        status, text = request(url, method, path, body, {**auth, **(headers or {})})
        try:
            msg = json.loads(text).get("error", "")
        except ValueError:
            msg = text[:80]
        out.append((name, status, msg[:110]))

    port = urllib.parse.urlsplit(url).port
    run("DNS rebinding: Host attacker.example reads /api/info", "GET", "/api/info",
        headers={"Host": f"attacker.example:{port}"})
    run("another site's page posts a form upload", "POST", "/api/samples", form,
        {"Content-Type": ctype, "Origin": "http://evil.example"})
    run("another site's page: text/plain JSON to /api/rollback", "POST", "/api/rollback", b'{"version": 1}',
        {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    run("text/plain JSON without an Origin", "POST", "/api/rollback", b'{"version": 1}', {"Content-Type": "text/plain"})
    run("Sec-Fetch-Site: cross-site starts a training", "POST", "/api/train", headers={"Sec-Fetch-Site": "cross-site"})
    run("a sandboxed page (Origin: null) deletes a class", "DELETE", "/api/labels/daisy", headers={"Origin": "null"})
    run("an EPS file named holiday.jpg (Ghostscript)", "POST", "/api/samples", form, {"Content-Type": ctype})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("--bundle", type=Path, default=None)
    a = p.parse_args()
    proc = None
    url = a.url
    if url is None:
        if a.bundle is None:
            p.error("give --url of a running service, or --bundle to start one")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = Path(tempfile.mkdtemp(prefix="edgetl-attack-")) / "store.sqlite"
        proc = subprocess.Popen([sys.executable, "-c", "from edgetl.cli.device_cmds import main; main()",
                                 "--bundle", str(a.bundle), "--store",
                                 str(store), "serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if request(url, "GET", "/api/info")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
    try:
        rows = cases(url, a.token)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    accepted = [r for r in rows if r[1] < 400]
    print(table(["attack", "status", "answer"], [[n, s, m] for n, s, m in rows]))
    print(f"{len(rows) - len(accepted)} of {len(rows)} refused")
    sys.exit(1 if accepted else 0)


if __name__ == "__main__":
    main()
