"""Helpers for end-to-end tests: serve a workspace and drive Debian's Chromium through Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    for candidate in (os.environ.get("ROBUSTLENS_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("Chromium not found: browser tests need Debian's 'chromium' package "
                       "(make test installs it) or ROBUSTLENS_CHROMIUM=/path/to/chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(workspace: Path, timeout: float = 90.0):
    """Run ``robustlens serve`` on a free loopback port; yields the base URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "robustlens.cli", "serve", str(workspace), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
                output = process.stdout.read() if process.poll() is not None else "(still running)"
                raise RuntimeError(f"dashboard did not come up on {url}: {output}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for_app_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit is connected and has finished running the script.

    Reads the state attributes Streamlit's own end-to-end tests use (``data-test-script-state`` on the
    app root), and as a fallback the absence of the 'Running…' status widget.
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
        timeout=timeout_ms)
