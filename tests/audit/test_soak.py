"""The soak's bookkeeping: rounds add up, a failed round fails the row, and a run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assured.audit.checker import Findings
from assured.audit.soak import add_up, kills, main, merge, table


def findings(verdict: str, lost: int, sigkills: int) -> Findings:
    return Findings(
        guarantee="exactly-once", log="embedded://x", sink="topic", sent=100, effects=100 - lost,
        dead_lettered=0, anomalies={"lost": [f"m{i}" for i in range(lost)]},
        faults={"sigkill": sigkills, "zombie": 1}, verdict=verdict,
        reasons=[] if verdict == "pass" else [f"lost {lost}"],
    )  # fmt: skip


def test_rounds_add_up_and_one_failed_round_fails_the_row() -> None:
    row = merge(None, findings("pass", 0, 5), seed=1000)
    row = merge(row, findings("fail", 2, 7), seed=1001)
    row = merge(row, findings("pass", 0, 3), seed=1002)
    assert row["rounds"] == 3
    assert row["sent"] == 300
    assert kills(row) == 15
    assert row["faults"]["zombie"] == 3
    assert row["lost"] == 2
    assert row["verdict"] == "fail"
    assert row["failed_rounds"] == [{"seed": 1001, "reasons": ["lost 2"]}]


def test_soaks_side_by_side_add_up(tmp_path: Path) -> None:
    one = merge(None, findings("pass", 0, 5), 1000, "aaa")
    one = merge(one, findings("pass", 0, 4), 1001, "bbb")
    two = merge(None, findings("fail", 3, 7), 101_000, "aaa")
    assert one["commits"] == ["aaa", "bbb"], "each round's source is kept"
    files = []
    for i, row in enumerate((one, two)):
        files.append(tmp_path / f"soak-{i}.json")
        files[-1].write_text(json.dumps([row]))
    out = tmp_path / "soak.json"
    assert main(["--merge", str(out), *map(str, files)]) == 1  # a failed round fails it all
    (row,) = json.loads(out.read_text())
    assert (row["rounds"], row["sent"], kills(row), row["lost"]) == (3, 300, 16, 3)
    assert row["faults"]["zombie"] == 3
    assert row["failed_rounds"] == [{"seed": 101_000, "reasons": ["lost 3"]}]
    assert row["commits"] == ["aaa", "bbb"]
    assert add_up(files[:1])[0]["verdict"] == "pass"


def test_the_readme_table_adds_side_by_side_soaks_up(tmp_path: Path) -> None:
    (tmp_path / "soak-embedded.json").write_text(
        json.dumps([merge(None, findings("pass", 0, 5), 1000, "aaa")])
    )
    (tmp_path / "soak-embedded-1.json").write_text(
        json.dumps([merge(None, findings("fail", 2, 7), 101_000, "bbb")])
    )
    (tmp_path / "soak-kafka.json").write_text(
        json.dumps([merge(None, findings("pass", 0, 1_234), 1000)])
    )
    head, rule, embedded, kafka = table(tmp_path)
    assert head.startswith("| log | guarantee | rounds |")
    assert rule.startswith("|---|")
    assert embedded == (
        "| embedded | **exactly-once** | 2 | 200 | 12 (1,000) | zombie 2 | **2** | **0** | "
        "**none** |"
    )
    assert "| 1,234 (1,000) |" in kafka


@pytest.mark.slow
def test_a_short_soak_on_the_embedded_engine_resumes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    args = ["--log", "embedded", "--out", str(out), "--messages", "600", "--kills", "6"]
    assert main([*args, "--scale", "0.003"]) == 0
    first = {r["guarantee"]: r for r in json.loads(out.read_text())}
    assert set(first) == {"at-most-once", "at-least-once", "exactly-once"}
    assert main([*args, "--scale", "0.006"]) == 0
    again = {r["guarantee"]: r for r in json.loads(out.read_text())}
    assert again["exactly-once"]["rounds"] >= first["exactly-once"]["rounds"]
    assert kills(again["exactly-once"]) >= 6
    assert all(
        r["lost"] == 0 and r["duplicated"] == 0 for g, r in again.items() if g == "exactly-once"
    )
