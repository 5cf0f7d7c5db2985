"""A throwaway PostgreSQL server for tests and benchmarks: a real `postgres` from the system's
binaries (Debian's `postgresql` package: /usr/lib/postgresql/<version>/bin), its cluster in a
temporary folder, listening on a free loopback port, trust authentication, fsync off.

Root cannot run postgres: as root the cluster belongs to the `postgres` user (created by the
Debian package) and the server runs under `runuser`. `server_binaries()` is None when no server
is installed; tests skip then, naming the package to install.

    with PostgresServer() as pg:
        url = pg.new_database("race")   # postgresql://postgres@127.0.0.1:PORT/race
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

INSTALL_HINT = "apt-get install -y postgresql (Debian), or put initdb/pg_ctl/postgres on PATH"


def server_binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None when no server is installed."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(os.path.realpath(which)).parent))
    for c in candidates:
        if c and all((Path(c) / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A PostgreSQL cluster in a fresh folder of the system's temp dir (the `postgres` user must
    reach it, so not under a root-only pytest tmp_path); stop() stops it and removes the folder."""

    def __init__(self, port: int | None = None):
        self.bin = server_binaries()
        if self.bin is None:
            raise FileNotFoundError(f"no PostgreSQL server binaries found; {INSTALL_HINT}")
        self.root = Path(tempfile.mkdtemp(prefix="ttsweep-pg-"))
        self.data = self.root / "pgdata"
        self.port = port or free_port()
        self.user = None if os.geteuid() != 0 else "postgres"
        if self.user is not None:
            try:
                pwd.getpwnam(self.user)
            except KeyError as exc:
                raise FileNotFoundError(f"running as root needs a 'postgres' user to own the server; {INSTALL_HINT}") from exc

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{args[0]} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-2000:]}")
        return res

    def start(self) -> "PostgresServer":
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run((["runuser", "-u", self.user, "--"] if self.user else [])
                           + [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, text=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database with a fresh name; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        import psycopg

        for attempt in range(50):
            try:
                with psycopg.connect(self.url(), autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                return self.url(name)
            except psycopg.OperationalError:  # the server is still starting
                if attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
