"""``python -m examples.notifications``: the notifications App, with its idempotency key and
without, audited under crashes against the stand-in API (started here, on a free port). The
first sends each notification once; the second sends some twice."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from examples._run import audit
from examples.notifications.api import NotificationsApi

ARGS = ["--input", "signups=examples.notifications.data:signups", "--id-field", "id",
        "--effects-sql", "SELECT notification_id FROM sent",
        "--expect", "exactly-once"]  # fmt: skip


def with_api(app: str) -> int:
    folder = Path(tempfile.mkdtemp(prefix="assured-notifications-"))
    server = NotificationsApi(folder / "sent.db")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return audit("--app", app, *ARGS, "--effects-db", str(folder / "sent.db"),
                     env={"NOTIFY_API": server.url})  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(folder, ignore_errors=True)


keyed = with_api("examples.notifications.app:app")
print("\nThe same App without the idempotency key:", flush=True)
unkeyed = with_api("examples.notifications.app:app_without_key")
raise SystemExit(0 if (keyed, unkeyed) == (0, 1) else 1)
