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
from assured.log.embedded import EmbeddedLog
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
    with pytest.raises(ConfigError, match="does not exist"):  # a wrong URL: nothing made
        open_log(f"embedded://{tmp_path}/nowhere/x.db")
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(EngineFileError, match="does not exist"):  # the engine says it too
        EmbeddedLog(tmp_path / "nowhere" / "x.db")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("embedded:/x.db", "lacks the '//'"),
        ("embedded:x.db", "lacks the '//'"),
        ("embedded://tmp/x.db", "ambiguous: write embedded:///tmp/x.db"),
        ("embedded:///", "names no file"),
        ("embedded:///tmp/", "names no file"),
        ("embedded:///tmp/x.db?durability", r"\?key=value"),
        ("embedded:///tmp/x.db#frag", "fragment"),
        ("embedded://[x/y.db", "malformed"),
        ("kafka://", "names no broker"),
        ("kafka:/host:9092", "lacks the '//'"),
        ("kafka://host:port", "host:port"),
        ("kafka://a:9092,,b:9092", "host:port"),
        ("kafka://host:9092/path", "no path"),
        ("file:///tmp/x.db", "unknown log URL"),
    ],
)
def test_malformed_urls_are_refused_and_make_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, why: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=why):
        open_log(url)
    assert list(tmp_path.iterdir()) == []


def test_url_errors_never_show_a_password() -> None:
    with pytest.raises(ConfigError) as caught:
        open_log("kafka://app:hunter2@host:port?sasl.password=hunter3")
    assert "hunter" not in str(caught.value)
    assert "***" in str(caught.value)


def test_readers_never_create_a_log(tmp_path: Path) -> None:
    """``create=False`` (what the CLI's readers pass): a missing file is a wrong path, and an
    empty one is not an engine file; neither is made into one."""
    missing = tmp_path / "typo.db"
    with pytest.raises(ConfigError, match=r"typo\.db does not exist.*topic create"):
        open_log(f"embedded://{missing}", create=False)
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(EngineFileError, match="is empty, not an assured engine file"):
        open_log(f"embedded://{empty}", create=False)
    assert empty.read_bytes() == b""
    open_log(f"embedded://{missing}")  # a writer may create it
    with open_log(f"embedded://{missing}", create=False).admin() as admin:
        assert admin.list_topics() == []


def test_record_limit_is_the_one_describe_shows(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 1)
        limit = int(admin.describe_topic("t").config["max.message.bytes"])
    assert limit == 1_000_000
    with log.producer() as producer:
        producer.send("t", b"k" * 10 + b"v" * (limit - 10), key=None, partition=0)
        with pytest.raises(RecordTooLargeError, match=f"{limit + 1} bytes.*limit of {limit}"):
            producer.send("t", b"v" * (limit - 9), key=b"k" * 10, partition=0)
        assert producer.flush() == 0
    with log.admin() as admin:
        assert admin.watermarks(TopicPartition("t", 0)).high == 1


def test_check_finds_damaged_batches_and_pages(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    log = EmbeddedLog(path)
    with log.admin() as admin:
        admin.create_topic("t", 2)
        admin.create_topic("other", 1)
    with log.producer() as producer:
        for i in range(3000):
            producer.send("t", os.urandom(100), key=b"%d" % i)
        producer.flush()
    log.check(["t", "other", "no-such-topic"])  # sound: says nothing
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE batches SET data = x'00' WHERE id = (SELECT max(id) FROM batches)")
    log.check(["other"])  # only the topics asked about are read
    with pytest.raises(EngineFileError, match=r"record batch at t\[\d\] offset \d+ is damaged"):
        log.check(["t"])
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with path.open("r+b") as f:
        for at in range(4096 * 2, size, 4096 * 3):
            f.seek(at)
            f.write(b"\xde\xad\xbe\xef" * 256)
    with pytest.raises(EngineFileError, match="corrupt"):
        log.check([])


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
