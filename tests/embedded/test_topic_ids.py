"""A topic's id names its incarnation: never reused on the embedded engine."""

from __future__ import annotations

from pathlib import Path

from assured.log import open_log


def test_a_topic_made_again_at_once_is_still_another_incarnation(tmp_path: Path) -> None:
    """From a fresh-clone run: a topic deleted and made again within the same millisecond got
    the same id (SQLite hands the last row id out again). Made again at once, many times,
    every incarnation differs; so do those of a file reopened."""
    path = tmp_path / "log.db"
    seen = []
    for _ in range(2):
        log = open_log(f"embedded://{path}")
        with log.admin() as admin:
            for _ in range(20):
                admin.create_topic("t", 1)
                seen.append(admin.describe_topic("t").topic_id)
                admin.delete_topic("t")
        log.close()
    assert len(set(seen)) == len(seen) == 40
