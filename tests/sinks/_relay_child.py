"""A dead-letter relay in a process of its own, killed with SIGKILL at a named point:
``python -m tests.sinks._relay_child SINK_PATH LOG_URL GROUP POINT``."""

from __future__ import annotations

import os
import signal
import sys

from assured.log import open_log
from assured.sinks import SqliteSink, relay_dead_letters


def main() -> None:
    path, url, group, point = sys.argv[1:5]

    def hook(reached: str) -> None:
        if reached == point:
            os.kill(os.getpid(), signal.SIGKILL)

    relay_dead_letters(SqliteSink(path), open_log(url), group, hook=hook)
    sys.exit(f"the relay never reached {point}")


if __name__ == "__main__":
    main()
