"""A real PostgreSQL server for the tests, started from Debian's binaries in a temporary folder.

:func:`postgres_server` (a session fixture, registered in ``conftest.py``) runs ``initdb`` and ``pg_ctl``
from ``/usr/lib/postgresql/<version>/bin`` — as the ``postgres`` user when the tests run as root, since
``initdb`` refuses root — in a temporary folder, listening on a free port on 127.0.0.1 only (its unix
socket stays in that folder), and stops and removes it at the end of the session. :func:`postgres_url`
gives each test a fresh, empty database on it as a SQLAlchemy URL
``postgresql+psycopg://postgres@127.0.0.1:PORT/<db>``.

Where the binaries (``make test`` installs Debian's ``postgresql``) or psycopg are missing, the fixture
fails with the reason under ``CI=true`` and skips with the reason otherwise.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Server settings for a throw-away test cluster: no durability work, loopback only.
SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
    "-c full_page_writes=off -c max_connections=60 -c shared_buffers=32MB"
)


@dataclass(frozen=True)
class PostgresServer:
    """A running server: ``port`` on 127.0.0.1, superuser ``postgres`` (trust authentication)."""

    port: int
    data_dir: Path

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


def _unavailable(reason: str) -> None:
    """Fail under CI (the server is part of what ``make test`` must check), skip elsewhere."""
    message = f"PostgreSQL tests need {reason} (`make test` installs Debian's postgresql and psycopg)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``pg_ctl`` (or ``$PG_BIN_DIR``)."""
    candidates = [os.environ["PG_BIN_DIR"]] if os.environ.get("PG_BIN_DIR") else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(args: list[str]) -> list[str]:
    """Run ``args`` as ``postgres`` when we are root (initdb and postgres refuse to run as root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _run(args: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run(_as_server_user(args), capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {result.stdout}{result.stderr}{tail}")


def start_server(bin_dir: Path, base: Path, *, attempts: int = 3) -> PostgresServer:
    """``initdb`` a cluster in ``base/data`` and start it on a free loopback port (retried on a port clash)."""
    data_dir = base / "data"
    _run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        "initdb",
    )
    log = base / "server.log"
    for attempt in range(attempts):
        port = _free_port()
        try:
            _run(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data_dir),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    f"-p {port} -k {base} {SERVER_OPTIONS}",
                    "start",
                ],
                "pg_ctl start",
                log,
            )
            return PostgresServer(port=port, data_dir=data_dir)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def stop_server(bin_dir: Path, server: PostgresServer) -> None:
    subprocess.run(
        _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-m", "immediate", "-w", "stop"]),
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole test session (started on first use, removed at the end)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _unavailable("Debian's PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb)")
    try:
        import psycopg  # noqa: F401 - only checks that the driver is installed
    except ImportError:
        _unavailable("the psycopg driver (pip install 'robustlens[postgres]')")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("a 'postgres' system user to run the server as (tests run as root)")
    base = Path(tempfile.mkdtemp(prefix="robustlens-pg-"))
    if os.geteuid() == 0:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    server = None
    try:
        server = start_server(bin_dir, base)
        yield server
    finally:
        if server is not None:
            stop_server(bin_dir, server)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh empty database on the session's server, dropped after the test; yields its SQLAlchemy URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.url(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
