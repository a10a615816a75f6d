"""A small local fake of the Hugging Face Hub HTTP API, so that tests can push and pull without huggingface.co.

`FakeHub` serves on 127.0.0.1 the endpoints that huggingface_hub 2.4 calls for `HfApi.create_repo`,
`upload_folder` / `upload_file` / `create_commit`, `model_info` / `repo_info`, `list_repo_tree`, `hf_hub_download`
and `snapshot_download`, which are also what transformers' `push_to_hub` and `from_pretrained` use:

    POST /api/repos/create                              {"name", "organization", "type", "visibility"}: 409 if it exists
    GET  /api/whoami-v2                                 the fake user
    POST /api/validate-yaml                             model card metadata: always valid
    POST /api/{type}s/{repo_id}/preupload/{rev}         every file is "regular": its content comes in the commit, no LFS
    POST /api/{type}s/{repo_id}/commit/{rev}            NDJSON: a header line, then "file" lines with base64 content
    GET  /api/{type}s/{repo_id}[/revision/{rev}]        repo info: id, sha, private, siblings
    GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]     files and folders, in one page; ?recursive=true for all
    HEAD|GET /[{type}s/]{repo_id}/resolve/{rev}/{path}  the file, with X-Repo-Commit, ETag and Content-Length

Errors carry the X-Error-Code that the client turns into its exceptions: RepoNotFound, RevisionNotFound, EntryNotFound.
Repos live in memory. Each commit keeps a snapshot of the files, so a commit hash is a revision as good as "main" (the
only branch). Any bearer token is accepted and recorded in `FakeHub.tokens`; a private repo is hidden from requests
without one. huggingface_hub reads HF_ENDPOINT when it is imported: run the client in a subprocess with `hub_env`.
"""

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "user"


def git_blob_sha(content: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag and oid of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def hub_env(endpoint: str, home, token: str | None = "hf_fake_token") -> dict[str, str]:
    """The environment of a subprocess whose huggingface_hub talks to `endpoint`, with a fresh cache in `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers=None, **body):
        super().__init__(message)
        self.status, self.code, self.headers, self.body = status, code, headers or {}, {"error": message, **body}


class Repo:
    """A repo's history: every commit's files by commit hash, and the head of its branch, main."""

    def __init__(self, private: bool):
        self.private = private
        self.snapshots: dict[str, dict[str, bytes]] = {}
        self.head = None
        self.commit({}, "initial commit")

    def commit(self, files: dict[str, bytes], summary: str) -> str:
        key = json.dumps([self.head, summary, sorted((path, git_blob_sha(c)) for path, c in files.items())])
        self.head = hashlib.sha1(key.encode()).hexdigest()
        self.snapshots[self.head] = files
        return self.head

    def files(self, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = self.head if revision == "main" else revision
        if sha not in self.snapshots:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, self.snapshots[sha]


class FakeHub:
    """The fake Hub, serving from a daemon thread until `stop()` or the end of a `with FakeHub() as hub:` block.

    Point a client at `hub.endpoint` with `hub_env(hub.endpoint, home)`; `hub.files(repo_id)` shows what it pushed.
    """

    ROUTES = [  # method(s), path pattern (groups are passed to the handler, unquoted), handler
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/(\w+)s/([^/]+/[^/]+)/preupload/([^/]+)", "preupload"),
        ("POST", r"/api/(\w+)s/([^/]+/[^/]+)/commit/([^/]+)", "commit"),
        ("GET", r"/api/(\w+)s/([^/]+/[^/]+)(?:/revision/([^/]+))?", "info"),
        ("GET", r"/api/(\w+)s/([^/]+/[^/]+)/tree/([^/]+)(?:/(.+))?", "tree"),
        ("GET HEAD", r"/(?:(dataset|space)s/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", "resolve"),
    ]

    def __init__(self):
        self.repos: dict[str, Repo] = {}  # by "{type}s/{repo_id}", e.g. "models/user/tiny-bert"
        self.tokens: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def files(self, repo_id: str, revision: str = "main", kind: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision, by path."""
        return dict(self.repos[f"{kind}s/{repo_id}"].files(revision)[1])

    def _repo(self, kind: str, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get(f"{kind}s/{repo_id}")
        if repo is None or (repo.private and token is None):
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    def _url(self, kind: str, repo_id: str) -> str:
        return f"{self.endpoint}/{'' if kind == 'model' else kind + 's/'}{repo_id}"

    def create_repo(self, request):
        payload = request.json()
        kind, repo_id = payload.get("type") or "model", f"{payload.get('organization') or USER}/{payload['name']}"
        with self._lock:
            if f"{kind}s/{repo_id}" in self.repos:
                raise HubError(409, None, "You already created this repo", url=self._url(kind, repo_id))
            self.repos[f"{kind}s/{repo_id}"] = Repo(private=payload.get("visibility") == "private")
        return {"url": self._url(kind, repo_id), "name": repo_id}

    def whoami(self, request):
        return {
            "type": "user",
            "name": USER,
            "fullname": "Fake User",
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
        }

    def validate_yaml(self, request):
        return {"errors": [], "warnings": []}

    def preupload(self, request, kind, repo_id, revision):
        _, files = self._repo(kind, repo_id, request.token).files(revision)
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None,
                }
                for f in request.json()["files"]
            ]
        }

    def commit(self, request, kind, repo_id, revision):
        repo = self._repo(kind, repo_id, request.token)
        header, *operations = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        with self._lock:
            if revision != "main":
                raise HubError(404, "RevisionNotFound", f"FakeHub only commits to main, not {revision}")
            files = dict(repo.files(revision)[1])
            for operation in operations:
                if operation["key"] != "file":
                    raise HubError(400, None, f"FakeHub does not implement {operation['key']} commit operations")
                files[operation["value"]["path"]] = base64.b64decode(operation["value"]["content"])
            sha = repo.commit(files, header["value"]["summary"])
        return {"commitUrl": f"{self._url(kind, repo_id)}/commit/{sha}", "commitOid": sha, "success": True}

    def info(self, request, kind, repo_id, revision):
        repo = self._repo(kind, repo_id, request.token)
        sha, files = repo.files(revision or "main")
        return {
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "siblings": [
                {"rfilename": path, "size": len(content), "blobId": git_blob_sha(content)}
                for path, content in files.items()
            ],
        }

    def tree(self, request, kind, repo_id, revision, folder):
        _, files = self._repo(kind, repo_id, request.token).files(revision)
        prefix = folder.strip("/") + "/" if folder else ""
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        entries = {}
        for path, content in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            folders = [prefix + "/".join(parts[:i]) for i in range(1, len(parts))]
            for folder_path in folders if recursive else folders[:1]:
                entries[folder_path] = {
                    "type": "directory",
                    "path": folder_path,
                    "size": 0,
                    "oid": hashlib.sha1(folder_path.encode()).hexdigest(),
                }
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha(content)}
        if folder and not entries:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist at {revision}")
        return list(entries.values())

    def resolve(self, request, kind, repo_id, revision, path):
        sha, files = self._repo(kind or "model", repo_id, request.token).files(revision)
        if path not in files:  # the commit lets the client remember the file's absence in its cache
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {revision}", {"X-Repo-Commit": sha})
        content = files[path]
        return content, {
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_sha(content)}"',
            "Content-Type": "application/octet-stream",
        }


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_GET

    def json(self):
        return json.loads(self.body)

    def _dispatch(self):
        hub: FakeHub = self.server.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.token = self.headers.get("Authorization", "").removeprefix("Bearer ") or None
        if self.token:
            hub.tokens.add(self.token)
        try:
            for methods, pattern, name in FakeHub.ROUTES:
                match = re.fullmatch(pattern, url.path)
                if match and self.command in methods.split():
                    result = getattr(hub, name)(self, *(group and unquote(group) for group in match.groups()))
                    body, headers = result if isinstance(result, tuple) else (result, {})
                    return self._send(200, body, headers)
            raise HubError(404, None, f"FakeHub does not implement {self.command} {url.path}")
        except HubError as error:
            code = {"X-Error-Code": error.code} if error.code else {}
            self._send(error.status, error.body, {**code, **error.headers})

    def _send(self, status: int, body, headers: dict[str, str]):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # keep the test output quiet
