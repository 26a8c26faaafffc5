"""A stand-in for an external notifications API: ``POST /notifications`` with a JSON body
``{"id": ...}`` sends one notification (a row in its SQLite file). With an ``Idempotency-Key``
header, a repeat of a key already seen sends nothing and answers as the first time did, as
payment and messaging APIs do; without one, every call sends.

    python -m examples.notifications.api --db /tmp/sent.db --port 8765
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sent (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "notification_id TEXT NOT NULL, idempotency_key TEXT UNIQUE)"
)


class NotificationsApi(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, db: Path, port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.db = db
        self.lock = threading.Lock()
        with sqlite3.connect(db) as conn:
            conn.execute(SCHEMA)
        conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A caller that died mid-call (the audit SIGKILLs them) is no error of the API's."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def send(self, notification_id: str, key: str | None) -> bool:
        """Send once per key (or every time, with none); True when it sent now."""
        with self.lock, sqlite3.connect(self.db, isolation_level=None) as conn:
            done = conn.execute(
                "INSERT INTO sent (notification_id, idempotency_key) VALUES (?, ?) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (notification_id, key),
            )
            sent = done.rowcount == 1
        conn.close()
        return sent


class _Handler(BaseHTTPRequestHandler):
    server: NotificationsApi

    def do_POST(self) -> None:
        if self.path != "/notifications":
            self._answer(404, {"error": f"no such path {self.path}"})
            return
        try:
            body: Any = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            notification_id = str(body["id"])
        except (ValueError, KeyError, TypeError):
            self._answer(400, {"error": 'expected a JSON object with "id"'})
            return
        sent = self.server.send(notification_id, self.headers.get("Idempotency-Key"))
        self._answer(201 if sent else 200, {"id": notification_id, "repeat": not sent})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: one line per call would drown the audit's output


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.notifications.api")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    server = NotificationsApi(args.db, args.port)
    print(f"URL={server.url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
