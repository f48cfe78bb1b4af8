"""The picker's web server: one self-contained page and two JSON endpoints, behind a random token.

Safe by default, unlike OpenDelta's (which listened on every interface and answered anyone): it
binds 127.0.0.1 unless told otherwise, and every request -- the page, the tree, a submission --
must carry the token printed in the URL, or gets 403. The page loads nothing from elsewhere, and
its Content-Security-Policy forbids it to.

The server only serves: a submission is handed to the thread that waits in
:meth:`PickerServer.next_submission`, which checks it (and attaches the delta) and answers it.
"""

from __future__ import annotations

import json
import queue
import secrets
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from deltadist.core import jsontext
from deltadist.errors import InteractiveError

LOCALHOST = "127.0.0.1"
MAX_SUBMISSION_BYTES = 16 * 2**20
"""Largest submission body read (a list of module names; a 70B model's full list is ~100 KB)."""
ANSWER_WAIT_S = 600.0
"""How long a submission waits for its answer (checking it attaches the delta on the caller's thread)."""
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@dataclass
class Submission:
    """One press of the page's submit button: the selected module names, and its pending answer."""

    paths: list[str]
    _answer: "queue.Queue[dict[str, Any]]" = field(default_factory=lambda: queue.Queue(maxsize=1), repr=False)
    _sent: threading.Event = field(default_factory=threading.Event, repr=False)

    def answer(self, reply: dict[str, Any]) -> None:
        """Send ``reply`` (JSON-able) to the page as the submission's response."""
        self._answer.put(reply)

    def wait_answer(self, timeout: float) -> dict[str, Any]:
        """The answer (the request handler's side), or an error reply after ``timeout`` seconds."""
        try:
            return self._answer.get(timeout=timeout)
        except queue.Empty:
            return {"ok": False, "error": "No answer from the waiting Python call."}

    def mark_sent(self) -> None:
        """Note that the page has been told the outcome of this submission."""
        self._sent.set()

    def wait_sent(self, timeout: float) -> bool:
        """Wait until the response went out (so closing the server does not cut it off)."""
        return self._sent.wait(timeout)


class PickerServer:
    """Serves ``payload`` (the page's JSON data) and the page on ``host:port`` until closed.

    Args:
        payload: the JSON the page fetches from ``/api/tree``.
        host: interface to bind (127.0.0.1 by default; another one exposes the page on the network).
        port: TCP port; 0 picks a free one.

    Raises:
        InteractiveError: the address cannot be bound (port taken, unknown host).
    """

    def __init__(self, payload: bytes, host: str = LOCALHOST, port: int = 0) -> None:
        self.token = secrets.token_urlsafe(32)
        self.payload = payload
        self.page = resources.files("deltadist.interactive").joinpath("page.html").read_bytes()
        self.submissions: queue.Queue[Submission] = queue.Queue()
        self.closing = threading.Event()
        try:
            server_class = _Server6 if ":" in host else _Server
            self.httpd = server_class((host, port), _Handler)
        except OSError as err:
            raise InteractiveError(
                f"Cannot serve the module picker on {host}:{port}: {err.strerror or err}. Pass another "
                "port (interactive_modify=PORT, or 0 for any free one; --port with deltadist pick)."
            ) from err
        self.httpd.picker = self
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="deltadist-picker", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """The page's address, token included."""
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/?token={self.token}"

    def start(self) -> "PickerServer":
        """Serve the page in a background thread; return ``self``."""
        self._thread.start()
        return self

    def next_submission(self, timeout: float) -> Submission | None:
        """The next submission, or ``None`` after ``timeout`` seconds."""
        try:
            return self.submissions.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop serving; submissions still queued are answered that the picker has stopped."""
        self.closing.set()
        while not self.submissions.empty():
            self.submissions.get_nowait().answer({"ok": False, "error": "The picker has stopped."})
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()

    def __enter__(self) -> "PickerServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    picker: PickerServer
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind also looks the host's name up (socket.getfqdn), which can stall
        # for seconds where DNS is unreachable; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "deltadist-picker"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self._authorised_path()
        if path == "/":
            self._send(HTTPStatus.OK, self.server.picker.page, "text/html; charset=utf-8", PAGE_HEADERS)
        elif path == "/api/tree":
            self._send(HTTPStatus.OK, self.server.picker.payload, "application/json")
        elif path is not None:
            self._send_json(HTTPStatus.NOT_FOUND, {"ok": False, "error": f"No such page: {path}"})

    def do_POST(self) -> None:  # noqa: N802
        path = self._authorised_path()
        if path is None:
            return
        if path != "/api/submit":
            self._send_json(HTTPStatus.NOT_FOUND, {"ok": False, "error": f"No such endpoint: {path}"})
            return
        paths = self._read_paths()
        if paths is None:
            return
        picker = self.server.picker
        if picker.closing.is_set():
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": "The picker has stopped."})
            return
        submission = Submission(paths)
        picker.submissions.put(submission)
        try:
            self._send_json(HTTPStatus.OK, submission.wait_answer(ANSWER_WAIT_S))
        finally:
            submission.mark_sent()

    def _authorised_path(self) -> str | None:
        """The request's path if it carries the token; otherwise answer 403 and return ``None``."""
        url = urlsplit(self.path)
        given = parse_qs(url.query).get("token", [""])[0]
        if not secrets.compare_digest(given.encode(), self.server.picker.token.encode()):
            self._send_json(HTTPStatus.FORBIDDEN, {"ok": False, "error": "Missing or wrong token: open the "
                                                   "URL printed by the waiting Python call."})
            return None
        return url.path

    def _read_paths(self) -> list[str] | None:
        """The submitted ``{"paths": [...]}``; on a malformed body answer 400 and return ``None``."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_SUBMISSION_BYTES:
            self._send_json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": "Bad submission size."})
            return None
        try:
            body = jsontext.loads(self.rfile.read(length))
        except jsontext.JSONTooDeepError as err:
            self._send_json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": f'Expected {{"paths": [names]}}, '
                                                     f"got {err}."})
            return None
        except ValueError:
            body = None
        paths = body.get("paths") if isinstance(body, dict) else None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            self._send_json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": 'Expected {"paths": [names]}.'})
            return None
        return paths

    def _send_json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                           **COMMON_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the waiting call prints what matters (the URL, the result)."""
