"""A test double of the Hugging Face Hub: an HTTP server on 127.0.0.1 that speaks the part of the protocol
huggingface_hub's `snapshot_download` uses (repo info, recursive tree listing, HEAD and GET of
`/{repo}/resolve/{commit}/{path}`), serving one repository from memory and recording every file it sends.
`claimed_sizes` makes the listing and HEAD report other sizes than the bytes (a 58 GB repo without 58 GB)."""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, files: dict[str, bytes], claimed_sizes: dict[str, int] | None = None):
        self.repo_id, self.files = repo_id, files
        self.claimed = claimed_sizes or {}
        self.downloads: list[str] = []
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _file(self):
                prefix = f"/{hub.repo_id}/resolve/"
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                if not path.startswith(prefix):
                    return None
                rel = path[len(prefix):].split("/", 1)[1]
                return rel if rel in hub.files else None

            def _headers(self, rel):
                data = hub.files[rel]
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(hub.claimed.get(rel, len(data))))

            def do_HEAD(self):
                hub.requests.append("HEAD " + self.path)
                rel = self._file()
                if rel is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                self.send_response(200)
                self._headers(rel)
                self.end_headers()

            def do_GET(self):
                hub.requests.append("GET " + self.path)
                url = urllib.parse.urlparse(self.path)
                path = urllib.parse.unquote(url.path)
                api = f"/api/models/{hub.repo_id}"
                if path.startswith(api + "/revision/"):
                    return self._json({"id": hub.repo_id, "sha": COMMIT,
                                       "siblings": [{"rfilename": f} for f in hub.files]})
                if path.startswith(api + "/tree/"):
                    return self._json([{"type": "file", "path": f, "size": hub.claimed.get(f, len(d)),
                                        "oid": hashlib.sha1(d).hexdigest()} for f, d in sorted(hub.files.items())])
                rel = self._file()
                if rel is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                hub.downloads.append(rel)
                data = hub.files[rel]
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
