"""Bad input gets a clear error, and nothing is lost or overwritten."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from assured.errors import (
    ConfigError,
    EngineFileError,
    InvalidTopicError,
    RecordTooLargeError,
    UnknownTopicError,
    UsageError,
)
from assured.log import TopicPartition, open_log
from assured.log.embedded._schema import SCHEMA_VERSION


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        (".", "cannot be named"),
        ("..", "cannot be named"),
        ("a" * 250, "at most 249"),
        ("has space", "characters Kafka refuses"),
        ("slash/topic", "characters Kafka refuses"),
        ("ünïcode", "characters Kafka refuses"),
    ],
)
def test_invalid_topic_names_are_refused(tmp_path: Path, name: str, why: str) -> None:
    with open_log(f"embedded://{tmp_path}/x.db").admin() as admin:
        with pytest.raises(InvalidTopicError, match=why):
            admin.create_topic(name)
        assert admin.list_topics() == []


def test_colliding_and_duplicate_topics_are_refused(tmp_path: Path) -> None:
    with open_log(f"embedded://{tmp_path}/x.db").admin() as admin:
        admin.create_topic("pay.ments", 2)
        with pytest.raises(InvalidTopicError, match=r"collides with existing topic 'pay\.ments'"):
            admin.create_topic("pay_ments")
        with pytest.raises(InvalidTopicError, match="already exists"):
            admin.create_topic("pay.ments", 5)
        assert admin.describe_topic("pay.ments").partitions == 2
        with pytest.raises(InvalidTopicError, match="at least one partition"):
            admin.create_topic("zero", 0)
        with pytest.raises(InvalidTopicError, match="unknown topic config"):
            admin.create_topic("cfg", 1, {"retention.mss": "5"})


def test_unknown_topic_is_an_error_unless_auto_create(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.producer() as producer, pytest.raises(UnknownTopicError, match="create it first"):
        producer.send("nope", b"v")
    with log.consumer(group_id="g") as consumer, pytest.raises(UnknownTopicError):
        consumer.subscribe(["nope"])
    auto = open_log(f"embedded://{tmp_path}/x.db?auto_create_topics=true&default_partitions=3")
    with auto.producer() as producer:
        producer.send("made-on-demand", b"v")
        assert producer.flush() == 0
    with auto.admin() as admin:
        assert admin.describe_topic("made-on-demand").partitions == 3


def test_partition_out_of_range(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 2)
    with log.producer() as producer, pytest.raises(UnknownTopicError, match=r"partitions 0\.\.1"):
        producer.send("t", b"v", partition=2)
    with log.consumer(group_id="g") as consumer, pytest.raises(UnknownTopicError):
        consumer.assign([TopicPartition("t", 9)])


def test_oversized_record_is_refused_and_others_still_land(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 1, {"max.message.bytes": "1000"})
    with log.producer() as producer:
        producer.send("t", b"small", partition=0)
        with pytest.raises(RecordTooLargeError, match=r"1001 bytes.*limit of 1000"):
            producer.send("t", b"x" * 1001, partition=0)
        producer.send("t", b"also small", partition=0)
        assert producer.flush() == 0
    with log.admin() as admin:
        assert admin.watermarks(TopicPartition("t", 0)).high == 2


def test_bad_urls_and_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown log URL"):
        open_log("postgres://x")
    with pytest.raises(ConfigError, match="names no file"):
        open_log("embedded://")
    with pytest.raises(ConfigError, match="durability"):
        open_log(f"embedded://{tmp_path}/x.db?durability=sometimes")
    with pytest.raises(ConfigError, match="unknown embedded log option"):
        open_log(f"embedded://{tmp_path}/x.db?durabilty=full")
    log = open_log(f"embedded://{tmp_path}/x.db")
    with pytest.raises(ConfigError, match="isolation"):
        log.consumer(isolation="dirty")  # type: ignore[arg-type]


def test_not_an_engine_file_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"my precious notes, not a database\n" * 10)
    before = path.read_bytes()
    with pytest.raises(EngineFileError, match="not a SQLite database at all"):
        open_log(f"embedded://{path}")
    assert path.read_bytes() == before


def test_other_sqlite_database_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    before = path.read_bytes()
    with pytest.raises(EngineFileError, match="not an assured engine file"):
        open_log(f"embedded://{path}")
    assert path.read_bytes() == before


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    open_log(f"embedded://{path}")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    with pytest.raises(EngineFileError, match="newer assured"):
        open_log(f"embedded://{path}")


def test_corrupt_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    log = open_log(f"embedded://{path}")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    with log.producer() as producer:
        for _ in range(3000):
            producer.send("t", os.urandom(100), partition=0)
        producer.flush()
    with sqlite3.connect(path) as conn:  # fold the WAL into the file, then damage its pages
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with path.open("r+b") as f:
        for at in range(4096 * 2, size, 4096 * 3):
            f.seek(at)
            f.write(b"\xde\xad\xbe\xef" * 256)

    def read_everything() -> None:
        reopened = open_log(f"embedded://{path}")
        with reopened.consumer(group_id="g") as consumer:
            consumer.assign([TopicPartition("t", 0)])
            while consumer.poll(timeout=0.2):
                pass

    with pytest.raises(EngineFileError, match="corrupt"):
        read_everything()


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(EngineFileError, match="does not exist"):
        open_log(f"embedded://{tmp_path}/nowhere/x.db")


@contextlib.contextmanager
def read_only_folder() -> Iterator[Path]:
    """A folder nobody can write to. Root ignores permission bits, so as root it is a read-only
    bind mount (as a read-only filesystem would be)."""
    folder = Path(tempfile.mkdtemp(prefix="assured-ro-"))
    mounted = False
    try:
        if os.geteuid() == 0:
            subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
            mounted = True
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        else:
            folder.chmod(0o555)
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        folder.chmod(0o700)
        shutil.rmtree(folder)


def test_read_only_folder() -> None:
    with read_only_folder() as folder:
        assert not os.access(folder, os.W_OK)
        with pytest.raises(EngineFileError, match="is read-only"):
            open_log(f"embedded://{folder}/x.db")
        assert list(folder.iterdir()) == []


def test_usage_errors_say_what_to_call(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    with log.producer(transactional_id="tx") as producer:
        with pytest.raises(UsageError, match="init_transactions"):
            producer.begin_transaction()
        producer.init_transactions()
        with pytest.raises(UsageError, match="begin_transaction"):
            producer.send("t", b"v")
    consumer = log.consumer(group_id="g")
    consumer.close()
    with pytest.raises(UsageError, match="closed"):
        consumer.poll()
