"""A throwaway PostgreSQL server on a temporary data directory and a free loopback port.

PostgreSQL refuses to run as root, so when this process is root the server's tools run as the
``postgres`` user that Debian's package creates. ``make test`` installs the package when missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from assured.errors import HarnessError
from assured.testing._net import free_ports

__all__ = ["PostgresServer", "find_bin_dir"]

_INSTALL_HINT = "Install PostgreSQL (apt-get install postgresql; `make test` does this itself)."


def find_bin_dir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: ``$ASSURED_PG_BIN`` or the newest Debian one."""
    env = os.environ.get("ASSURED_PG_BIN")
    found = [env] if env else sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version)
    for d in reversed(found):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise HarnessError(
        f"PostgreSQL's server programs (initdb, pg_ctl) are not installed. {_INSTALL_HINT}"
    )


def _version(path: str) -> tuple[int, ...]:
    part = Path(path).parent.name
    return tuple(int(x) for x in part.split(".") if x.isdigit())


@dataclass
class PostgresServer:
    """One PostgreSQL server under ``workdir``. ``fsync`` off by default: only for tests that
    never kill PostgreSQL itself."""

    workdir: Path
    fsync: bool = False
    port: int = 0
    bin_dir: Path | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> Self:
        bin_dir = self.bin_dir or find_bin_dir()
        self.bin_dir = bin_dir
        self.workdir.mkdir(parents=True, exist_ok=True)
        owner = self._owner()
        if owner is not None:
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
        self.port = self.port or free_ports(1)[0]
        data, log = self.workdir / "data", self.workdir / "server.log"
        self._run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            "initdb",
            timeout,
        )
        options = (
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1"
            f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
            " -c max_prepared_transactions=20"
        )
        self._run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                str(int(timeout)),
                "-o",
                options,
                "start",
            ],
            "pg_ctl start",
            timeout,
        )
        return self

    def stop(self) -> None:
        data = self.workdir / "data"
        if self.bin_dir is None or not (data / "postmaster.pid").exists():
            return
        self._run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            "pg_ctl stop",
            60,
        )

    def restart(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server and start it again on the same port and data. ``fast`` ends every
        session (their clients get *terminating connection due to administrator command*);
        ``immediate`` kills the server outright, and it recovers from its WAL on start."""
        if mode not in ("smart", "fast", "immediate"):
            raise HarnessError(f"restart mode {mode!r}: smart, fast or immediate")
        if self.bin_dir is None:
            raise HarnessError("PostgreSQL restart before start()")
        data, log = self.workdir / "data", self.workdir / "server.log"
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(timeout)),
                "restart",
            ],
            f"pg_ctl restart -m {mode}",
            timeout,
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _owner() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise HarnessError(
                "running as root, and there is no 'postgres' user to run PostgreSQL as "
                f"(PostgreSQL refuses root). {_INSTALL_HINT}"
            ) from None

    def _run(self, cmd: list[str], step: str, timeout: float) -> None:
        owner = self._owner()
        if owner is not None:
            cmd = ["runuser", "-u", owner.pw_name, "--", *cmd]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise HarnessError(
                f"PostgreSQL {step} took over {timeout:.0f}s: {shlex.join(cmd)}"
            ) from e
        if done.returncode != 0:
            log = self.workdir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            hint = (
                f"\nThe '{owner.pw_name}' user runs the server: it must be able to reach "
                f"{self.workdir} (every folder above it needs o+x; pytest's own tmp_path does not)."
                if owner is not None
                else ""
            )
            raise HarnessError(
                f"PostgreSQL {step} failed (exit {done.returncode}): {shlex.join(cmd)}\n"
                f"{done.stdout[-1500:]}{done.stderr[-1500:]}{tail}{hint}"
            )
