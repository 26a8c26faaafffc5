"""What ``python -m examples.<name>`` does: audit the example App with ``assured audit --app``
under SIGKILLs and crash points, from the project's folder, and print the audit's table."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ["--faults", "sigkill,crash-points", "--kills", "6"]


def audit(*args: str, env: dict[str, str] | None = None) -> int:
    """Run ``assured audit`` with ``args``; its exit status (1: a verdict failed)."""
    assured = Path(sys.executable).parent / "assured"
    command = [str(assured), "audit", *FAULTS, *args, *sys.argv[1:]]
    print("$ assured", shlex.join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, check=False)
    return done.returncode
