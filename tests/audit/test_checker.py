"""The checker's rules, on histories written by hand: what each guarantee promises about a
message's outcome (an effect or a dead letter), and how transaction labels are read."""

from __future__ import annotations

import json

import pytest

from assured.audit.checker import Effect, Findings, History, check, parse_history
from assured.log import Record

IDS = ["m-0", "m-1", "m-2", "m-3"]
KEYS = dict.fromkeys(IDS, "acct-1")
SOURCE = [Record("in", 0, n, 0, b"acct-1", b"", [("id", i.encode())]) for n, i in enumerate(IDS)]


def effect(mid: str, txn: str | None = None, run: str | None = None) -> Effect:
    return Effect(mid, "acct-1", "0@0", txn, run)


def findings(
    guarantee: str,
    effects: list[Effect],
    dead_letters: list[str] = (),  # type: ignore[assignment]
    fates: dict[str, str] | None = None,
    history: History | None = None,
) -> Findings:
    return check(
        guarantee=guarantee,
        log_url="embedded:///x.db",
        sink="topic",
        ids=IDS,
        keys=KEYS,
        fates=fates or {},
        acked=set(IDS),
        source=SOURCE,
        effects=effects,
        dead_letters=dead_letters,
        history=history,
        hanging=[],
        regressions=[],
    )


def every_effect() -> list[Effect]:
    return [effect(i) for i in IDS]


def test_one_effect_each_passes_every_guarantee() -> None:
    for guarantee in ("at-most-once", "at-least-once", "exactly-once"):
        f = findings(guarantee, every_effect())
        assert f.verdict == "pass", f.as_json()
        assert all(not ids for ids in f.anomalies.values())


def test_a_dead_letter_repeated_is_a_duplicate() -> None:
    fates = {"m-3": "permanent"}
    effects = every_effect()[:3]
    once = findings("exactly-once", effects, ["m-3"], fates)
    assert once.verdict == "pass", once.as_json()
    twice = {g: findings(g, effects, ["m-3", "m-3"], fates) for g in ("at-most-once",
             "at-least-once", "exactly-once")}  # fmt: skip
    for f in twice.values():
        assert f.anomalies["duplicate"] == ["m-3"]
        assert f.dead_lettered == 2, "dead letters are counted with their multiplicity"
    assert twice["exactly-once"].reasons == ["duplicate=1"]
    assert twice["at-most-once"].verdict == "fail"
    assert twice["at-least-once"].verdict == "pass", "extra outcomes are at-least-once's price"


def test_an_effect_and_a_dead_letter_are_two_outcomes() -> None:
    """An ok message both effected and dead-lettered (say, dead-lettered because the database
    blinked, then handled again): two outcomes."""
    by = {g: findings(g, every_effect(), ["m-1"]) for g in ("at-most-once", "at-least-once",
          "exactly-once")}  # fmt: skip
    for f in by.values():
        assert f.anomalies["effect-and-dead-letter"] == ["m-1"]
        assert f.anomalies["duplicate"] == []
    assert by["exactly-once"].verdict == "fail"
    assert by["at-most-once"].verdict == "fail"
    assert by["at-least-once"].verdict == "pass"


def test_an_effect_of_a_refused_message_fails_every_guarantee() -> None:
    """A message whose handler never returns can only have an effect if a failed attempt's
    output leaked."""
    fates = {"m-2": "permanent"}
    for guarantee in ("at-most-once", "at-least-once", "exactly-once"):
        f = findings(guarantee, every_effect(), ["m-2"], fates)
        assert f.anomalies["refused-effect"] == ["m-2"]
        assert f.verdict == "fail", guarantee
        assert "refused-effect=1" in f.reasons


def test_lost_means_no_outcome_of_the_kind_the_message_must_have() -> None:
    fates = {"m-2": "oversize", "m-3": "transient"}
    f = findings("at-least-once", [effect("m-0"), effect("m-1"), effect("m-2")], [], fates)
    # m-2's effect does not stand for its missing dead letter; m-3 has nothing
    assert f.anomalies["lost"] == ["m-2", "m-3"]
    assert f.verdict == "fail"
    assert findings("at-most-once", [effect("m-0"), effect("m-1")], ["m-2"], fates).verdict == (
        "pass"
    ), "at-most-once counts loss"
    dead_lettered_instead = findings("exactly-once", every_effect()[:2], ["m-2", "m-3"], fates)
    assert dead_lettered_instead.anomalies["lost"] == ["m-3"]


def test_labels_are_keyed_by_run_so_a_restart_that_counts_from_one_again_is_not_an_abort() -> None:
    history = parse_history(
        json.dumps(line)
        for line in (
            {"txn": "g-slot0:1", "outcome": "aborted", "run": "first"},
            {"txn": "g-slot0:1", "outcome": "committed", "run": "second"},
        )
    )
    f = findings("exactly-once", [effect(i, "g-slot0:1", "second") for i in IDS], history=history)
    assert f.verdict == "pass", f.as_json()
    aborted = findings("exactly-once", [effect(i, "g-slot0:1", "first") for i in IDS], [], None,
                       history)  # fmt: skip
    assert aborted.anomalies["aborted-read"] == IDS
    assert aborted.verdict == "fail"


def test_a_label_told_both_ways_or_unknown_is_ambiguous_never_an_aborted_read() -> None:
    history = parse_history(
        json.dumps(line)
        for line in (
            {"txn": "t:a:1", "outcome": "aborted", "run": "r"},
            {"txn": "t:a:1", "outcome": "committed", "run": "r"},
            {"txn": "t:a:2", "outcome": "unknown", "run": "r"},
        )
    )
    effects = [effect("m-0", "t:a:1", "r"), effect("m-1", "t:a:2", "r")]
    effects += [effect("m-2", "t:a:3", "r"), effect("m-3", "t:a:3", "r")]  # nothing told
    f = findings("exactly-once", effects, history=history)
    assert f.anomalies["aborted-read"] == []
    assert f.ambiguous_transactions == 2
    assert f.verdict == "pass", f.as_json()


def test_history_skips_a_line_cut_short_and_collects_fired_faults() -> None:
    lines = [
        json.dumps({"fault": "handler-errors", "kind": "transient", "id": "m-1", "run": "r"}),
        json.dumps({"fault": "handler-errors", "kind": "transient", "id": "m-1", "run": "s"}),
        json.dumps({"fault": "slow-handler", "id": "m-2", "phase": "asleep"}),
        '{"txn": "t:1", "outco',  # the process was SIGKILLed mid-write
        "",
    ]
    history = parse_history(lines)
    assert history.fired == {"handler-errors": {"m-1"}, "slow-handler": {"m-2"}}
    assert dict(history.outcomes) == {}


@pytest.mark.parametrize("guarantee", ["at-most-once", "at-least-once", "exactly-once"])
def test_unseen_and_regressions_fail_every_guarantee(guarantee: str) -> None:
    f = check(
        guarantee=guarantee, log_url="", sink="topic", ids=IDS, keys=KEYS, fates={},
        acked={*IDS, "m-9"}, source=SOURCE, effects=every_effect(), dead_letters=[],
        hanging=[], regressions=["in[0]: 5 -> 3"],
    )  # fmt: skip
    assert f.reasons == ["unseen=1", "commit-regression=1"]


def test_a_duplicate_comes_with_the_transactions_that_wrote_it() -> None:
    """Which transactions hold the repeated effects, and what their processors said of them:
    what a human needs to tell positions that did not move from an abort that did not happen."""
    history = parse_history(
        json.dumps(line)
        for line in (
            {"txn": "t:a:1", "outcome": "committed", "run": "r"},
            {"txn": "t:a:2", "outcome": "committed", "run": "r"},
        )
    )
    effects = [effect(i, "t:a:1", "r") for i in IDS] + [effect(i, "t:a:2", "r") for i in IDS[:3]]
    f = findings("exactly-once", effects, history=history)
    assert f.reasons == ["duplicate=3"]
    told = {
        (t["txn"], tuple(t["told"]), t["duplicated_effects"]) for t in f.evidence["transactions"]
    }
    assert told == {("t:a:1", ("committed",), 3), ("t:a:2", ("committed",), 3)}
    assert [e["txn"] for e in f.evidence["ids"]["m-0"]["effects"]] == ["t:a:1", "t:a:2"]
    assert f.as_json()["evidence"] == f.evidence
    assert findings("exactly-once", every_effect()).evidence == {}, "no duplicate, no evidence"


def app_findings(
    guarantee: str, effects: list[Effect], dead_letters: list[str], refused: tuple[str, ...] = ()
) -> Findings:
    """As ``assured audit --app`` asks: inputs marked ``"expect": "dead-letter"`` must be
    refused, the rest must have effects; the effects are in no known order."""
    return check(
        guarantee=guarantee,
        log_url="embedded:///x.db",
        sink="postgres",
        ids=IDS,
        keys=KEYS,
        fates=dict.fromkeys(refused, "poison"),
        acked=set(IDS),
        source=SOURCE,
        effects=effects,
        dead_letters=dead_letters,
        hanging=[],
        regressions=[],
        ordered=False,
    )


def test_an_apps_dead_letter_counts_only_where_the_input_expects_one() -> None:
    """An App that dead-letters real work has lost it, unless the input said it must be
    refused; effects come in any order (rows of a query)."""
    one_each = [effect("m-3"), effect("m-1"), effect("m-0")]
    passed = app_findings("exactly-once", one_each, ["m-2"], refused=("m-2",))
    assert passed.verdict == "pass", passed.as_json()
    unexpected = app_findings("exactly-once", one_each, ["m-2"])
    assert unexpected.anomalies["lost"] == ["m-2"]
    assert unexpected.verdict == "fail"
    both = app_findings("exactly-once", [*one_each, effect("m-2")], ["m-2"], refused=("m-2",))
    assert both.anomalies["effect-and-dead-letter"] == ["m-2"]
    assert both.anomalies["refused-effect"] == ["m-2"]
    twice = app_findings("at-least-once", [*one_each, effect("m-1"), effect("m-2")], [])
    assert twice.anomalies["duplicate"] == ["m-1"]
    assert twice.verdict == "pass"  # at-least-once counts repeats


@pytest.mark.parametrize("guarantee", ["at-most-once", "at-least-once", "exactly-once"])
def test_an_effect_of_no_input_fails_every_guarantee(guarantee: str) -> None:
    """An effect whose id is no input's (an output without the id field, a row of something
    else) cannot be traced: the audit says so rather than ignore it."""
    f = app_findings(guarantee, [*every_effect(), effect("?receipts[0]@7")], [])
    assert f.anomalies["stray-effect"] == ["?receipts[0]@7"]
    assert f.verdict == "fail"
    assert "stray-effect=1" in f.reasons
