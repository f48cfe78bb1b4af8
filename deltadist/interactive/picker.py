"""``interactive_modify``: pick the modules to modify on a local web page, get the patterns back.

The waiting call serves the page (see :mod:`deltadist.interactive.server`), turns each submitted
selection into the shortest patterns that select exactly it, re-selects with
:func:`~deltadist.addressing.select.select_sites` (the code that resolves typed patterns) and hands
the patterns to ``attempt`` -- which builds and attaches the delta, all or nothing. A refusal
(a module the method cannot modify) goes back to the page; the user fixes the selection and submits
again. A timeout or Ctrl-C ends the wait with nothing attached.
"""

from __future__ import annotations

import json
import sys
import time
import webbrowser
from typing import Callable, Iterable, TextIO

from torch import nn

from deltadist.addressing.names import dot_prefixes
from deltadist.addressing.select import select_sites
from deltadist.errors import ConfigError, DeltaError, InteractiveError
from deltadist.interactive.patterns import shortest_patterns
from deltadist.interactive.server import LOCALHOST, PickerServer, Submission
from deltadist.interactive.tree import delta_module_ids, page_tree, selectable_names

DEFAULT_PORT = 8888
"""``interactive_modify=True``'s port (OpenDelta's)."""
DEFAULT_TIMEOUT_S = 3600.0
"""How long the call waits for a submission by default, so a forgotten page does not stay open."""
POLL_S = 0.2
"""The wait is sliced so that Ctrl-C lands promptly on every platform."""


def picker_port(interactive_modify: bool | int | None) -> int | None:
    """OpenDelta's ``interactive_modify``: ``False``/``None`` off, ``True`` port 8888, an int that
    port (``0``: any free one).

    Raises:
        ConfigError: not a bool or a port number.
    """
    if interactive_modify is None or interactive_modify is False:
        return None
    if interactive_modify is True:
        return DEFAULT_PORT
    if isinstance(interactive_modify, int) and 0 <= interactive_modify <= 65535:
        return interactive_modify
    raise ConfigError(f"interactive_modify must be True (port {DEFAULT_PORT}), a port number 0-65535 "
                      f"(0: any free port) or False, got {interactive_modify!r}.")


def pick_modules(backbone: nn.Module, attempt: Callable[[list[str]], None], *, title: str,
                 broadcast: bool = False, initial: Iterable[str] = (), defaults: Iterable[str] = (),
                 port: int = 0, host: str = LOCALHOST, timeout: float | None = DEFAULT_TIMEOUT_S,
                 open_browser: bool = False, out: TextIO | None = None) -> list[str]:
    """Serve the picker page for ``backbone`` until a selection is submitted that ``attempt`` accepts.

    Args:
        backbone: the model whose modules are shown.
        attempt: called with the patterns of each checked selection; builds and attaches the delta,
            or raises a :class:`~deltadist.errors.DeltaError` (shown on the page; nothing changed).
        title: the page's heading (``"LoraModel on LlamaForCausalLM"``).
        broadcast: the method modifies everything inside a selected module (BitFit): a selection
            stands for its subtrees, and the patterns select with subtree semantics.
        initial: module names selected when the page opens.
        defaults: module names the method's defaults select (the page's "method defaults" button).
        port: TCP port (0: any free one).
        host: interface to listen on; other than 127.0.0.1 only when asked.
        timeout: seconds to wait for an accepted selection (``None``: no limit).
        open_browser: also open the page in the default browser.
        out: where the URL and the result are printed (default: stdout).

    Returns:
        The accepted patterns (also printed as ``modified_modules: [...]``).

    Raises:
        InteractiveError: the server cannot start, or no selection was accepted within ``timeout``.
        KeyboardInterrupt: Ctrl-C while waiting. Either way nothing was attached.
    """
    out = out if out is not None else sys.stdout
    payload = page_payload(backbone, title, broadcast, initial, defaults)
    with PickerServer(payload, host, port) as server:
        _announce(server, host, timeout, out)
        if open_browser:
            webbrowser.open(server.url)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            submission = _wait(server, deadline, timeout)
            try:
                patterns = patterns_for(backbone, submission.paths, broadcast)
                attempt(patterns)
            except DeltaError as err:
                submission.answer({"ok": False, "error": str(err)})
                continue
            submission.answer({"ok": True, "patterns": patterns})
            submission.wait_sent(timeout=5)
            print(f"modified_modules: {patterns}", file=out, flush=True)
            return patterns


def page_payload(backbone: nn.Module, title: str, broadcast: bool = False, initial: Iterable[str] = (),
                 defaults: Iterable[str] = ()) -> bytes:
    """The JSON the page loads: its title, the tree (:func:`~deltadist.interactive.tree.page_tree`),
    whether selections broadcast, and the module names initially selected and of the defaults."""
    payload = {"title": title, "broadcast": broadcast, "tree": page_tree(backbone),
               "initial": list(initial), "defaults": list(defaults)}
    return json.dumps(payload, separators=(",", ":")).encode()


def _announce(server: PickerServer, host: str, timeout: float | None, out: TextIO) -> None:
    limit = "without a time limit" if timeout is None else f"up to {timeout:g} s"
    print(f"Pick the modules to modify: open {server.url}\n(waiting {limit}; Ctrl-C cancels and "
          "leaves the model unchanged)", file=out, flush=True)
    if host != LOCALHOST:
        print(f"Warning: the picker listens on {host}, not only on this machine; anyone who has the "
              "URL (token included) can submit a selection.", file=out, flush=True)


def _wait(server: PickerServer, deadline: float | None, timeout: float | None) -> Submission:
    """The next submission; a timeout or Ctrl-C ends the wait, saying that nothing was attached."""
    try:
        while True:
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left <= 0:
                raise InteractiveError(
                    f"interactive_modify: no selection was submitted within {timeout:g} s, so nothing "
                    "was attached and the backbone is unchanged. Call again (interactive_timeout=None "
                    "waits without a limit), or pass modified_modules=[...]."
                )
            submission = server.next_submission(left)
            if submission is not None:
                return submission
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interactive_modify cancelled (Ctrl-C): nothing was attached and the "
                                "backbone is unchanged.") from None


def patterns_for(backbone: nn.Module, paths: Iterable[str], broadcast: bool = False) -> list[str]:
    """The shortest patterns selecting exactly the modules ``paths`` (canonical names) of ``backbone``.

    With ``broadcast`` a module stands for its subtree: the patterns name the outermost selected
    modules and select their subtrees.

    Raises:
        AddressingError: nothing selected, an unknown name, or a selection no pattern set can express.
    """
    universe = selectable_names(backbone)
    chosen = set(paths)
    if broadcast:
        chosen = {p for p in chosen if not any(a in chosen for a in list(dot_prefixes(p))[:-1])}
    patterns = shortest_patterns(chosen, universe)
    sites = select_sites(backbone, patterns, (), skip=delta_module_ids(backbone), within=broadcast)
    expected = {n for n in universe if any(a in chosen for a in dot_prefixes(n))} if broadcast else chosen
    if {site.name for site in sites} != expected:  # a bug, not bad input: the patterns were matched
        raise RuntimeError(f"The picker's patterns {patterns} select other modules than the ones "
                           "chosen on the page. Please report this.")
    return patterns
