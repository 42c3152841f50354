"""Helpers for end-to-end tests: serve a workspace and drive Debian's Chromium through Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path

from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    for candidate in (os.environ.get("ROBUSTLENS_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError(
        "Chromium not found: browser tests need Debian's 'chromium' package "
        "(make test installs it) or ROBUSTLENS_CHROMIUM=/path/to/chromium"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(workspace: Path, *extra: str, timeout: float = 90.0):
    """Run ``robustlens serve WORKSPACE --port P *extra`` on a free loopback port; yields the base URL."""
    port = free_port()
    # Server output goes to a file, not a pipe nobody reads (a pipe would block the server once its
    # ~64 KB buffer filled); it is shown when the server fails to come up.
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as log:
        command = [sys.executable, "-m", "robustlens.cli", "serve", str(workspace), "--port", str(port), *extra]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    state = "exited" if process.poll() is not None else "still running"
                    raise RuntimeError(f"dashboard did not come up on {url} ({state}): {log.read()[-4000:]}")
                time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for_app_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit is connected and no script run is going in the browser's view.

    Reads the state attributes Streamlit's own end-to-end tests use (``data-test-script-state`` on the
    app root), and as a fallback the absence of the 'Running…' status widget. This says nothing about a
    rerun that was requested but has not started yet (right after a click, it is already true): to wait
    for the effect of an action, use :meth:`ScriptRuns.expect_run`.
    """
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    page.wait_for_function(
        """() => {
            const app = document.querySelector("[data-testid='stApp']");
            const state = app && app.getAttribute('data-test-script-state');
            if (state !== null) {
                return state === 'notRunning' && app.getAttribute('data-test-connection-state') === 'CONNECTED';
            }
            const status = document.querySelector("[data-testid='stStatusWidget']");
            return !status || !status.innerText.includes('Running');
        }""",
        timeout=timeout_ms,
    )


@contextlib.contextmanager
def holding_requests(page, url_pattern):
    """Hold back the page's requests for ``url_pattern`` inside the block; they go through on leaving it.

    A slow network or a busy machine for one resource (a component's script), made deterministic. Yields
    the list of held requests, so a test can check that the pattern still matches something.
    """
    held = []
    releasing = False

    def hold(route) -> None:
        if releasing:
            route.continue_()
        else:
            held.append(route)

    page.route(url_pattern, hold)
    try:
        yield held
    finally:
        releasing = True
        for route in held:
            route.continue_()
        page.unroute(url_pattern, hold)


class ScriptRuns:
    """Counts the script runs the server finished for one page, read from the page's Streamlit websocket.

    The ``data-test-script-state`` attribute says whether a run is going *now*; right after a click or a key
    press it still says ``notRunning``, because the rerun the action requested has not reached the browser
    yet. Waiting on it then returns at once, before the action has had any effect. The server's
    ``script_finished`` messages are counted here instead: an action's rerun is over when the count has
    gone past its value from before the action. Runs cut short for another run (``st.rerun()``,
    ``st.switch_page``, a newer action) do not count: the run that replaces them does.
    """

    def __init__(self, page) -> None:
        self.page = page
        self.completed = 0
        self._socket = None
        page.on("websocket", self._watch)

    def _watch(self, socket) -> None:
        if socket.url.endswith("/_stcore/stream"):
            self._socket = socket
            socket.on("framereceived", self._count)

    def _count(self, payload) -> None:
        if _ends_a_run(payload):
            self.completed += 1

    def wait_for(self, count: int, timeout_ms: int = 60_000) -> None:
        """Wait until ``count`` runs have finished (then let the browser finish drawing the last one)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while self.completed < count:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms <= 0:
                raise TimeoutError(f"{self.completed} script run(s) finished, waited for {count}")
            if self._socket is None or self._socket.is_closed():
                self.page.wait_for_event("websocket", timeout=remaining_ms)
            else:  # returns on the next run's end; _count has seen that frame by then, the loop checks again
                self._socket.wait_for_event("framereceived", predicate=_ends_a_run, timeout=remaining_ms)
        wait_for_app_idle(self.page, timeout_ms=max(int((deadline - time.monotonic()) * 1000), 1_000))

    @contextlib.contextmanager
    def expect_run(self, timeout_ms: int = 60_000):
        """Wait, on leaving the block, for the run that the block's action started to finish and be drawn."""
        before = self.completed
        yield
        self.wait_for(before + 1, timeout_ms)


def _ends_a_run(payload: str | bytes) -> bool:
    """Whether a websocket frame from the server is the end of a script run that was not cut short."""
    if isinstance(payload, str):
        return False
    message = ForwardMsg()
    message.ParseFromString(payload)
    return (
        message.WhichOneof("type") == "script_finished"
        and message.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN
    )


_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def watch_script_runs(page) -> ScriptRuns:
    """Start counting ``page``'s script runs; call it before the page opens the app."""
    _RUNS[page] = ScriptRuns(page)
    return _RUNS[page]


def script_runs(page) -> ScriptRuns:
    """The counter :func:`watch_script_runs` attached to ``page``."""
    return _RUNS[page]
