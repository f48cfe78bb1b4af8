"""Drive a call that serves the module picker (``interactive_modify``) from a test.

The call blocks until a selection is submitted, so it runs on a thread; its stdout and stderr are
watched for the URL it prints. If a test fails before submitting, the call gets a Ctrl-C (a
``KeyboardInterrupt`` raised in its thread), which closes its server; calls under test also pass an
``interactive_timeout``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import re
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

URL = re.compile(r"http://\S+\?token=\S+")


class Picking:
    """A picker call running on a thread: its URL, its API, its result."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.printed = io.StringIO()
        self._url_seen = threading.Event()
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._outcome["value"] = call()
        except BaseException as err:  # handed to the test thread by result()
            self._outcome["error"] = err
        finally:
            self._url_seen.set()  # a call that failed before printing a URL must not leave url() waiting

    def write(self, text: str) -> int:
        self.printed.write(text)
        if URL.search(self.printed.getvalue()):
            self._url_seen.set()
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def url(self) -> str:
        """The page's URL (token included), once the call printed it."""
        assert self._url_seen.wait(60), "the call printed no URL within 60 s"
        found = URL.search(self.printed.getvalue())
        assert found, f"the call ended without serving a page: {self._outcome}"
        return found.group(0)

    def api(self, path: str) -> str:
        """The URL of ``path`` (``/api/tree``) with the token."""
        base, token = self.url.split("/?")
        return f"{base}{path}?{token}"

    def tree(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.api("/api/tree"), timeout=30) as response:
            return json.loads(response.read())

    def submit(self, paths: list[str]) -> dict[str, Any]:
        """POST a selection as the page does; the reply."""
        request = urllib.request.Request(self.api("/api/submit"), data=json.dumps({"paths": paths}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def result(self, timeout: float = 60) -> Any:
        """The call's return value (its exception is raised here)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the call did not return within {timeout} s"
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


@contextlib.contextmanager
def picking(call: Callable[[], Any], join_timeout: float = 30) -> Iterator[Picking]:
    """Run ``call`` on a thread with stdout and stderr watched; on exit, a call still waiting is interrupted
    (as by Ctrl-C: it closes its server) and the thread joined."""
    run = Picking(call)
    # Process-wide: the thread's prints land here too (stderr for deltadist pick's URL).
    with contextlib.redirect_stdout(run), contextlib.redirect_stderr(run):
        run._thread.start()
        try:
            yield run
        finally:
            if run._thread.is_alive() and run._thread.ident is not None:
                # The wait polls in Python, so an exception set on the thread lands within a poll.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(run._thread.ident),
                                                           ctypes.py_object(KeyboardInterrupt))
            run._thread.join(join_timeout)


def status_of(url: str, data: bytes | None = None) -> int:
    """The HTTP status of a GET (or, with ``data``, a POST) to ``url``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
