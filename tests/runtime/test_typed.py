"""Typed messages: a pydantic model class as a handler's codec. Each record is validated into the
model (``msg.value`` is a ``Charge``); what the handler sends is written as JSON; a record that
does not validate is dead-lettered at once (a retry cannot change its bytes), with the
validation message in its headers, and under exactly-once exactly one dead letter and no
effect, even when its transaction is aborted and redone."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from assured import App, Message, Output, Record, TopicPartition, open_log
from assured.errors import ConfigError
from assured.log import Log
from assured.runtime import DecodeError
from assured.runtime._message import ModelCodec, codec
from assured.runtime._settings import Guarantee

GUARANTEES: list[Guarantee] = ["at-most-once", "at-least-once", "exactly-once"]


class Charge(BaseModel):
    id: int
    cents: int


class Receipt(BaseModel):
    charge: int
    ok: bool


class Account(BaseModel):
    account: str


GOOD = [{"id": i, "cents": 100 * i} for i in range(1, 6)]
INVALID = b'{"id": 7, "cents": "lots"}'  # JSON, but not a Charge
NOT_JSON = b"charge #8"


def read(log: Log, topic: str) -> list[Record]:
    """Every committed record of partition 0 of ``topic``, read up to its last stable offset."""
    tp = TopicPartition(topic, 0)
    out: list[Record] = []
    with log.consumer(isolation="read_committed") as consumer, log.admin() as admin:
        consumer.assign([tp])
        deadline = time.monotonic() + 20
        while consumer.position(tp) < admin.watermarks(tp).lso and time.monotonic() < deadline:
            out += consumer.poll(timeout=0.2)
    return out


def fill(log: Log, values: list[bytes], keys: list[bytes] | None = None) -> None:
    with log.producer() as producer:
        for i, v in enumerate(values):
            producer.send("charges", v, key=(keys[i] if keys else b'{"account": "a"}'))
        producer.flush()


@pytest.fixture
def log(tmp_path: Path) -> Log:
    opened = open_log(f"embedded://{tmp_path}/log.db")
    with opened.admin() as admin:
        admin.create_topic("charges", 1)
        admin.create_topic("receipts", 1)
        # Room for one receipt, not for a receipt and its 3,000-byte note.
        admin.create_topic("notes", 1, {"max.message.bytes": "2000"})
    return opened


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_handlers_get_model_instances_and_invalid_records_are_dead_lettered_once(
    log: Log, guarantee: Guarantee
) -> None:
    values = [json.dumps(g).encode() for g in GOOD[:2]] + [INVALID, NOT_JSON]
    values += [json.dumps(g).encode() for g in GOOD[2:]]
    fill(log, values)
    app = App(log=log, group="g", guarantee=guarantee)
    calls: list[Charge] = []

    @app.handler("charges", output="receipts", value_codec=Charge, key_codec=Account)
    def charge(msg: Message[Charge], out: Output) -> None:
        assert isinstance(msg.value, Charge)
        assert msg.key == Account(account="a")
        calls.append(msg.value)
        out.send(Receipt(charge=msg.value.id, ok=True), key=msg.key)

    stats = app.run(until_idle=0.3)

    assert stats.processed == len(values)
    assert [c.id for c in calls] == [1, 2, 3, 4, 5], "never called for a bad record, never twice"
    receipts = read(log, "receipts")
    assert [json.loads(r.value or b"") for r in receipts] == [
        {"charge": i, "ok": True} for i in range(1, 6)
    ]
    assert {r.key for r in receipts} == {b'{"account":"a"}'}
    dead = read(log, "charges.dlq")
    assert [d.value for d in dead] == [INVALID, NOT_JSON], "one dead letter each, in order"
    invalid, not_json = dead
    for d in dead:
        assert d.header("assured.error.type") == b"DecodeError"
        assert d.header("assured.attempts") == b"1", "not retried: its bytes will not change"
    message = (invalid.header("assured.error.message") or b"").decode()
    assert "does not validate as Charge" in message
    assert "cents: Input should be a valid integer" in message
    assert "lots" not in message, "an input is never quoted: it may be a secret"
    assert invalid.header("assured.origin") == b"charges[0]@2"
    assert "Invalid JSON" in (not_json.header("assured.error.message") or b"").decode()
    with log.admin() as admin:
        assert sum(lag.lag for lag in admin.lag("g", ["charges"])) == 0


def test_exactly_once_an_invalid_record_in_an_aborted_transaction_has_one_dead_letter(
    log: Log, caplog: pytest.LogCaptureFixture
) -> None:
    """The invalid record's dead letter is written into a transaction that then aborts (a later
    record's second output goes to a topic the log lacks, after its first was sent). The redo
    writes it again: a read_committed reader sees one dead letter, and no effect of it."""
    big = json.dumps({"id": 99, "cents": 1}).encode()
    fill(log, [json.dumps(GOOD[0]).encode(), INVALID, json.dumps(GOOD[1]).encode(), big])
    fill(log, [json.dumps(GOOD[2]).encode()])
    # One transaction for all of them, until the failure aborts it.
    app = App(log=log, group="g", guarantee="exactly-once", commit_interval_ms=60_000)
    aborted: list[str] = []

    def told(label: str, outcome: str) -> None:
        if outcome == "aborted":
            aborted.append(label)

    app.on_transaction = told

    @app.handler("charges", output="notes", value_codec=Charge, retries=1, backoff_ms=1)
    def charge(msg: Message[Charge], out: Output) -> None:
        out.send(Receipt(charge=msg.value.id, ok=True))
        if msg.value.id == 99:
            # Refused as it goes out, not at send: the attempt is half in the transaction.
            out.send({"note": "x"}, topic="no-such-topic")

    with caplog.at_level(logging.WARNING, logger="assured.runtime"):
        stats = app.run(until_idle=0.3)

    assert stats.processed >= 5
    assert aborted
    sent = [r for r in caplog.records if r.getMessage().startswith("dead letter: charges[0]@1 ")]
    assert len(sent) == 2, "its first dead letter was in the aborted transaction"
    dead = read(log, "charges.dlq")
    assert [d.value for d in dead].count(INVALID) == 1
    assert sorted(json.loads(d.value or b"")["id"] for d in dead if d.value != INVALID) == [99]
    notes = [json.loads(r.value or b"") for r in read(log, "notes")]
    assert notes == [{"charge": i, "ok": True} for i in (1, 2, 3)], "each effect once; none of 7"


def test_a_model_codec_encodes_and_decodes() -> None:
    c = codec(Charge)
    assert isinstance(c, ModelCodec)
    assert c.decode(b'{"id": 1, "cents": 5}') == Charge(id=1, cents=5)
    assert json.loads(c.encode(Receipt(charge=1, ok=True))) == {"charge": 1, "ok": True}
    assert json.loads(c.encode({"any": ["json"]})) == {"any": ["json"]}


def test_a_codec_class_instead_of_an_instance_is_refused_at_registration() -> None:
    class Upper:
        def encode(self, value: str) -> bytes:
            return value.upper().encode()

        def decode(self, data: bytes) -> str:
            return data.decode()

    app = App(log="embedded:///tmp/never-opened.db")
    with pytest.raises(ConfigError, match=r"pass an instance, Upper\(\)"):
        app.handler("t", value_codec=Upper)
    with pytest.raises(ConfigError, match="pydantic model class"):
        app.handler("t", value_codec=int)
    assert issubclass(DecodeError, Exception)


@pytest.mark.kafka
def test_on_kafka_exactly_once_an_invalid_record_is_one_dead_letter_and_no_effect(
    kafka_bootstrap: str,
) -> None:
    from tests.conftest import create_topic

    log = open_log(f"kafka://{kafka_bootstrap}")
    src, out = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    with log.producer() as producer:
        for v in (json.dumps(GOOD[0]).encode(), INVALID, json.dumps(GOOD[1]).encode()):
            producer.send(src, v, partition=0)
        producer.flush()
    app = App(log=log, group=f"g-{src}", guarantee="exactly-once", session_timeout_ms=6000)
    calls: list[int] = []

    @app.handler(src, output=out, value_codec=Charge)
    def charge(msg: Message[Charge], o: Output) -> None:
        calls.append(msg.value.id)
        o.send(Receipt(charge=msg.value.id, ok=True))

    app.run(until_idle=1)

    assert calls == [1, 2]
    assert [json.loads(r.value or b"") for r in read(log, out)] == [
        {"charge": 1, "ok": True},
        {"charge": 2, "ok": True},
    ]
    (dead,) = read(log, f"{src}.dlq")
    assert dead.value == INVALID
    assert dead.header("assured.attempts") == b"1"
    assert b"cents: Input should be a valid integer" in (
        dead.header("assured.error.message") or b""
    )
