"""Loopback helpers shared by the local service harnesses."""

from __future__ import annotations

import contextlib
import socket
import time

__all__ = ["free_ports", "port_open", "wait_for_port"]


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that nothing listens on right now, all distinct."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_for_port(port: int, deadline: float, host: str = "127.0.0.1") -> bool:
    """Poll until ``port`` accepts a connection or ``time.monotonic()`` passes ``deadline``."""
    while time.monotonic() < deadline:
        if port_open(port, host):
            return True
        time.sleep(0.2)
    return port_open(port, host)
