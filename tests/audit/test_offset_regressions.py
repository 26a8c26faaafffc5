"""The audit's commit-regression check confirms a drop with a stable read before it counts it
(tests/kafka/test_offsets_after_failover.py shows why on a real cluster): a plain read that a
new group coordinator answered from a lagging replica is not the group going backwards."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from assured import TopicPartition, open_log
from assured.audit.supervisor import _consumed

TP0, TP1 = TopicPartition("in", 0), TopicPartition("in", 1)


class _Run(SimpleNamespace):
    """What _consumed reads of a run: its config, its admin, the offsets seen so far."""

    def event(self, kind: str, **data: Any) -> None:
        self.events.append((kind, data))


def _run(
    tmp_path: Path, plain: dict[TopicPartition, int], stable: dict[TopicPartition, int]
) -> Any:
    class Admin:
        def committed_offsets(self, group: str, topics: Any, *, stable: bool = False) -> Any:
            return dict(stable_offsets if stable else plain)

    stable_offsets = stable
    return _Run(
        cfg=SimpleNamespace(guarantee="at-most-once", sink="topic"),
        admin=Admin,
        group="g",
        inputs=["in"],
        last_committed={TP0: 234, TP1: 100},
        regressions=[],
        events=[],
    )


def test_a_drop_the_stable_read_does_not_show_is_not_a_regression(tmp_path: Path) -> None:
    run = _run(tmp_path, plain={TP0: 186, TP1: 120}, stable={TP0: 240, TP1: 120})
    _consumed(run, {TP0: 1000, TP1: 1000})
    assert run.regressions == []
    assert run.last_committed == {TP0: 240, TP1: 120}
    assert run.events[0][0] == "offset-read-lagged"


def test_a_drop_the_stable_read_shows_too_is_a_regression(tmp_path: Path) -> None:
    run = _run(tmp_path, plain={TP0: 186, TP1: 120}, stable={TP0: 190, TP1: 120})
    _consumed(run, {TP0: 1000, TP1: 1000})
    assert run.regressions == [f"{TP0}: 234 -> 190"]


def test_the_embedded_admin_takes_the_stable_flag(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("in", 1)
        assert admin.committed_offsets("g", ["in"], stable=True) == {}
