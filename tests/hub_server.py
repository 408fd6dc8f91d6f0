"""A model hub on 127.0.0.1 that serves local folders the way the Hugging Face Hub serves repos.

Nothing can be downloaded here, yet the real download path (huggingface_hub resolving a repo id,
fetching each file into an empty HF cache, then transformers loading it) is what a new runtime
pays. Point ``HF_ENDPOINT`` at :attr:`HubServer.endpoint` and a repo id such as
``stand-in/llama`` loads through that path from the folder registered under it.

It answers the hub's file protocol (``HEAD``/``GET /<repo>/resolve/<rev>/<file>`` with the
``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers, ranges), the repo info and tree
calls, and a 404 with ``X-Error-Code: EntryNotFound`` for a file the repo lacks. It counts the
file bytes it sent and logs every request, so a test can assert that a start downloaded nothing.
No throttling: loopback speed, the cheapest a download can be.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.requests: list[str] = []
        self.failing = 0  # the next this-many requests are answered 503 (an outage that passes)
        self.bytes_sent = 0
        self._etags: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub", daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def file_requests(self) -> list[str]:
        return [r for r in self.requests if "/resolve/" in r]

    # ------------------------------------------------------------------ repos
    def _etag(self, path: Path) -> str:
        with self._lock:
            if path not in self._etags:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                self._etags[path] = h.hexdigest()
            return self._etags[path]

    def _split(self, path: str) -> tuple[str, Path, str] | None:
        """(repo, folder, rest) for a path that starts with a known repo id."""
        for repo, folder in self.repos.items():
            if path == repo or path.startswith(repo + "/"):
                return repo, folder, path[len(repo) + 1:]
        return None

    def _files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file())

    def _info(self, repo: str, folder: Path) -> dict:
        return {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False, "disabled": False,
                "siblings": [{"rfilename": str(p.relative_to(folder))} for p in self._files(folder)]}

    def _tree(self, folder: Path, sub: str) -> list[dict] | None:
        base = folder / sub if sub else folder
        if not base.is_dir():
            return None
        return [{"type": "directory" if p.is_dir() else "file", "path": str(p.relative_to(folder)),
                 "size": p.stat().st_size if p.is_file() else 0, "oid": COMMIT}
                for p in sorted(base.iterdir())]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body and not head:
                    self.wfile.write(body)

            def _json(self, doc, head=False):
                self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, head)

            def _missing(self, code: str, head=False):
                self._send(404, json.dumps({"error": code}).encode(),
                           {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}, head)

            def _serve(self, head: bool):
                path = unquote(urlparse(self.path).path).lstrip("/")
                with hub._lock:
                    hub.requests.append(f"{self.command} /{path}")
                    failing = hub.failing > 0
                    hub.failing -= failing
                if failing:
                    return self._send(503, b"outage", {"Content-Type": "text/plain"}, head)
                api = path.startswith("api/models/")
                found = hub._split(path[len("api/models/"):] if api else path)
                if found is None:
                    return self._missing("RepoNotFound", head)
                repo, folder, rest = found
                if api:
                    if rest == "" or rest.startswith("revision/"):
                        return self._json(hub._info(repo, folder), head)
                    if rest.startswith("tree/"):
                        sub = rest.split("/", 2)[2] if rest.count("/") >= 2 else ""
                        tree = hub._tree(folder, sub)
                        return self._json(tree, head) if tree is not None else self._missing("EntryNotFound", head)
                    return self._missing("EntryNotFound", head)
                if not rest.startswith("resolve/") or rest.count("/") < 2:
                    return self._missing("EntryNotFound", head)
                file = folder / rest.split("/", 2)[2]
                if not file.is_file():
                    return self._missing("EntryNotFound", head)
                size = file.stat().st_size
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub._etag(file)}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(size - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.end_headers()
                if head:
                    return
                with open(file, "rb") as f:
                    f.seek(start)
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        self.wfile.write(chunk)
                        with hub._lock:
                            hub.bytes_sent += len(chunk)

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

        return Handler
