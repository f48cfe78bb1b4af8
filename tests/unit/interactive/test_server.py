"""The picker's server: every request needs the token, it listens on 127.0.0.1 only, bad input is refused."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from deltadist.errors import InteractiveError
from deltadist.interactive.server import PickerServer
from tests.picking import status_of

pytestmark = pytest.mark.timeout(60)
PAYLOAD = json.dumps({"title": "t", "tree": {}}).encode()


@pytest.fixture
def server() -> Iterator[PickerServer]:
    picker = PickerServer(PAYLOAD).start()
    try:
        yield picker
    finally:
        picker.close()


def _base(server: PickerServer) -> str:
    host, port = server.address
    return f"http://{host}:{port}"


@pytest.mark.parametrize("path", ["/", "/api/tree", "/api/submit", "/favicon.ico", "/../etc/passwd"])
@pytest.mark.parametrize("token", [None, "", "wrong", "WRONG-but-long-enough-to-look-like-a-real-token-0"])
def test_requests_without_the_right_token_are_refused(server: PickerServer, path: str,
                                                     token: str | None) -> None:
    url = _base(server) + path + ("" if token is None else f"?token={token}")
    assert status_of(url) == 403
    assert status_of(url, data=b'{"paths": ["x"]}') == 403
    assert server.submissions.empty()


def test_the_token_opens_the_page_and_the_tree(server: PickerServer) -> None:
    with urllib.request.urlopen(server.url, timeout=30) as response:
        page = response.read().decode()
        csp = response.headers["Content-Security-Policy"]
    assert "<script>" in page and "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not any(marker in page for marker in ("src=\"http", "href=\"http", "@import", "url(http"))
    with urllib.request.urlopen(f"{_base(server)}/api/tree?token={server.token}", timeout=30) as response:
        assert response.read() == PAYLOAD
    assert status_of(f"{_base(server)}/nothing?token={server.token}") == 404


def test_tokens_are_random_and_long() -> None:
    first, second = PickerServer(PAYLOAD), PickerServer(PAYLOAD)
    try:
        assert first.token != second.token and len(first.token) >= 40
    finally:
        first.close()
        second.close()


def test_it_listens_on_127_0_0_1_only(server: PickerServer) -> None:
    host, port = server.address
    assert host == "127.0.0.1" and server.url.startswith(f"http://127.0.0.1:{port}/?token=")
    other = _other_local_address()
    if other is None:
        pytest.skip("this machine has no interface address besides loopback to try")
    with pytest.raises(OSError), socket.create_connection((other, port), timeout=5):
        pass


def _other_local_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (no packet is sent)."""
    candidates = set()
    try:
        candidates.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # UDP connect picks the outgoing interface, sends nothing
        candidates.add(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    others = sorted(a for a in candidates if not a.startswith("127.") and a != "0.0.0.0")
    return others[0] if others else None


def test_a_taken_port_is_an_error_that_says_how_to_pick_another(server: PickerServer) -> None:
    with pytest.raises(InteractiveError, match=r"127\.0\.0\.1:\d+.*another port.*0 for any free one"):
        PickerServer(PAYLOAD, port=server.address[1])


@pytest.mark.parametrize("body", [b"", b"not json", b'{"paths": "q_proj"}', b'{"paths": [1]}', b"[]"])
def test_malformed_submissions_are_refused(server: PickerServer, body: bytes) -> None:
    assert status_of(f"{_base(server)}/api/submit?token={server.token}", data=body) == 400
    assert server.submissions.empty()


def test_a_submission_is_answered_by_the_waiting_thread(server: PickerServer) -> None:
    def answer() -> None:
        submission = server.next_submission(timeout=30)
        assert submission is not None
        submission.answer({"ok": True, "patterns": submission.paths})

    waiter = threading.Thread(target=answer, daemon=True)
    waiter.start()
    request = urllib.request.Request(f"{_base(server)}/api/submit?token={server.token}",
                                     data=json.dumps({"paths": ["a.b"]}).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == {"ok": True, "patterns": ["a.b"]}
    finally:
        waiter.join(timeout=30)


def test_after_close_nothing_listens() -> None:
    picker = PickerServer(PAYLOAD).start()
    port = picker.address[1]
    picker.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


@pytest.mark.parametrize("body", [
    b'{"paths": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"paths": ["a"], "x": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
], ids=["paths", "array", "objects"])
def test_a_body_nested_100000_deep_gets_a_json_400(server: PickerServer, body: bytes) -> None:
    """Was a ``RecursionError`` in the handler: the connection dropped without an answer."""
    request = urllib.request.Request(f"{_base(server)}/api/submit?token={server.token}", data=body)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
    answer = json.loads(err.value.read())
    assert answer["ok"] is False
    assert re.fullmatch(r'Expected \{"paths": \[names\]\}, got JSON nested 10000[0-2] levels deep '
                        r"\(at most 100 are read\)\.", answer["error"]), answer["error"]
    assert server.submissions.empty()
