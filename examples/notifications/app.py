"""Notifications: each signup sends one welcome notification through an external HTTP API.

At-least-once: a crash after the call and before the commit hands the signup over again, and
the call is made again. The API cannot be part of a transaction, so the handler makes the
repeat harmless: it sends an ``Idempotency-Key`` derived from the signup, and the API sends
once per key. The effects at the API are then exactly once (the idempotent consumer).
``app_without_key`` is the same App without the key: the audit shows its duplicates.

    NOTIFY_API=http://127.0.0.1:8765 assured run examples.notifications.app:app
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

from assured import App, Message

API = os.environ.get("NOTIFY_API", "http://127.0.0.1:8765")
if not API.startswith(("http://", "https://")):
    raise ValueError(f"NOTIFY_API={API!r}: an http:// or https:// URL")


def notify(signup: dict[str, Any], idempotency_key: str | None) -> None:
    """POST the welcome notification; an error (refused, unreachable) raises, and the runtime
    retries the record, then dead-letters it."""
    headers = {"Content-Type": "application/json"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    request = urllib.request.Request(  # noqa: S310 -- API is checked to be http(s) above
        f"{API}/notifications",
        data=json.dumps({"id": signup["id"], "user": signup["user"]}).encode(),
        headers=headers,
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 -- as above
        answer.read()


app = App(log="embedded:///tmp/assured-examples/notifications.db", group="notifications",
          guarantee="at-least-once")  # fmt: skip


@app.handler("signups", key_codec="str", value_codec="json")
def welcome(msg: Message[Any]) -> None:
    # The same signup always gets the same key, whichever delivery of it this is.
    notify(msg.value, idempotency_key=f"welcome-{msg.value['id']}")


app_without_key = App(log="embedded:///tmp/assured-examples/notifications.db",
                      group="notifications-without-key", guarantee="at-least-once")  # fmt: skip


@app_without_key.handler("signups", key_codec="str", value_codec="json")
def welcome_without_key(msg: Message[Any]) -> None:
    notify(msg.value, idempotency_key=None)  # the mistake: a repeat sends again
