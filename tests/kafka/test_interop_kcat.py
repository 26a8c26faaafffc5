"""Interop with a client nobody here wrote: kcat (librdkafka's command-line tool, from Debian).

What assured commits in a transaction kcat reads with read_committed, and what it aborts kcat
does not; what kcat produces assured reads back with the same keys, values and headers."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from assured.log import TopicPartition, open_log, partition_for_key
from tests.contract.conftest import drain, unique

pytestmark = pytest.mark.kafka

KCAT = shutil.which("kcat") or "kcat"


def kcat(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [KCAT, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kcat_reads_committed_and_not_aborted(kafka_bootstrap: str) -> None:
    log = open_log(f"kafka://{kafka_bootstrap}")
    name = unique("interop")
    with log.admin() as admin:
        admin.create_topic(name, 1)
    with log.producer(transactional_id=unique("tx")) as producer:
        producer.init_transactions()
        producer.begin_transaction()
        for i in range(10):
            producer.send(name, f"aborted-{i}".encode(), key=b"k", partition=0)
        producer.flush(30)
        producer.abort_transaction()
        producer.begin_transaction()
        for i in range(10):
            producer.send(name, f"committed-{i}".encode(), key=b"k", partition=0)
        producer.commit_transaction()
    base = ["-C", "-b", kafka_bootstrap, "-t", name, "-o", "beginning", "-e", "-J", "-q"]
    committed = [
        json.loads(x) for x in kcat(*base, "-X", "isolation.level=read_committed").split("\n") if x
    ]
    everything = [
        json.loads(x)
        for x in kcat(*base, "-X", "isolation.level=read_uncommitted").split("\n")
        if x
    ]
    assert [m["payload"] for m in committed] == [f"committed-{i}" for i in range(10)]
    assert {m["key"] for m in committed} == {"k"}
    assert [m["payload"] for m in everything] == [f"aborted-{i}" for i in range(10)] + [
        f"committed-{i}" for i in range(10)
    ]


def test_assured_reads_what_kcat_produces(kafka_bootstrap: str) -> None:
    log = open_log(f"kafka://{kafka_bootstrap}")
    name = unique("interop")
    with log.admin() as admin:
        admin.create_topic(name, 3)
    lines = "".join(f"key-{i}:value-{i}\n" for i in range(30))
    kcat("-P", "-b", kafka_bootstrap, "-t", name, "-K", ":", "-H", "origin=kcat", "-H", "n=7",
         "-X", "partitioner=murmur2_random", stdin=lines)  # fmt: skip
    with log.consumer(group_id=unique("g")) as consumer:
        consumer.assign([TopicPartition(name, p) for p in range(3)])
        records = drain(consumer, 30)
    assert sorted((r.key, r.value) for r in records) == sorted(
        (f"key-{i}".encode(), f"value-{i}".encode()) for i in range(30)
    )
    for r in records:
        assert r.headers == (("origin", b"kcat"), ("n", b"7"))
        assert r.key is not None
        # With murmur2_random, kcat puts a key where Java clients and assured do.
        assert r.partition == partition_for_key(r.key, 3)
    assert len(records) == 30
