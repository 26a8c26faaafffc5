"""Session fixtures that start real services: an Apache Kafka broker, a three-node Kafka
cluster, and a PostgreSQL server. Each starts on first use and stops at the end of the session.
A service that cannot start fails every test that needs it, with the reason; nothing skips."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from assured import App
from assured.errors import HarnessError
from assured.log import Log, TopicPartition
from assured.testing.kafka import KafkaCluster
from assured.testing.postgres import PostgresServer


def _start_cluster(tmp: pytest.TempPathFactory, nodes: int) -> KafkaCluster:
    cluster = KafkaCluster(workdir=tmp.mktemp(f"kafka{nodes}"), nodes=nodes)
    try:
        return cluster.start()
    except HarnessError as e:
        pytest.fail(f"could not start a {nodes}-node Kafka cluster: {e}", pytrace=False)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A real single-node Apache Kafka broker (KRaft, transactions on)."""
    cluster = _start_cluster(tmp_path_factory, 1)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaCluster) -> str:
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def _kafka_cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    cluster = _start_cluster(tmp_path_factory, 3)
    yield cluster
    cluster.stop()


@pytest.fixture
def kafka_cluster(_kafka_cluster3: KafkaCluster) -> Iterator[KafkaCluster]:
    """A real three-node Kafka cluster; a test may ``kill(node)`` and ``restart(node)``. Any
    node a test left dead is restarted afterwards, so the next test gets all three."""
    yield _kafka_cluster3
    for node in _kafka_cluster3.members:
        if node.node_id not in _kafka_cluster3.running():
            _kafka_cluster3.restart(node.node_id)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on a temporary data directory and a free port."""
    # Not under pytest's tmp_path: that is private to root, and the server runs as 'postgres'.
    workdir = Path(tempfile.mkdtemp(prefix="assured-pg-"))
    server = PostgresServer(workdir=workdir)
    try:
        server.start()
    except HarnessError as e:
        pytest.fail(f"could not start PostgreSQL: {e}", pytrace=False)
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres: PostgresServer) -> str:
    return postgres.dsn


def create_topic(
    bootstrap: str, partitions: int = 1, replication: int = 1, config: dict[str, str] | None = None
) -> str:
    """A new topic with a unique name, created and confirmed before returning."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(
        name, num_partitions=partitions, replication_factor=replication, config=config or {}
    )
    for future in admin.create_topics([topic], operation_timeout=30).values():
        future.result(timeout=60)
    return name


def known_topics(log: Log, bootstrap: str, count: int) -> tuple[str, ...]:
    """``count`` new topics of one partition, once ``log``'s own metadata has them all
    (created is not yet known to every client)."""
    topics = tuple(create_topic(bootstrap) for _ in range(count))
    deadline = time.monotonic() + 30
    with log.admin() as admin:
        while not set(topics) <= set(admin.list_topics()):
            assert time.monotonic() < deadline, "the new topics never showed up"
            time.sleep(0.1)
    return topics


# -- the summary shows that the real services were used ----------------------------------------

SERVICE_MARKERS = ("kafka", "cluster", "postgres")
_outcomes: dict[str, dict[str, int]] = {m: {} for m in SERVICE_MARKERS}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        for marker in SERVICE_MARKERS:
            if marker in report.keywords:
                counts = _outcomes[marker]
                counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    parts = []
    for marker, counts in _outcomes.items():
        if counts:
            parts.append(f"{marker}: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
    if parts:
        terminalreporter.write_line("real services used -- " + "; ".join(parts))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A test that needs a real service never counts as done by being skipped.
    if any(counts.get("skipped") for counts in _outcomes.values()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def fill_keyed(log: Log, n: int, keys: int = 10) -> list[bytes]:
    """``n`` records into topic ``in`` (two partitions, alternating), keys ``k0`` ... cycling
    over ``keys``; their values, ``m0000`` on."""
    values = [f"m{i:04d}".encode() for i in range(n)]
    with log.producer() as producer:
        for i, v in enumerate(values):
            producer.send("in", v, key=f"k{i % keys}".encode(), partition=i % 2)
        producer.flush()
    return values


def read_values(log: Log, topic: str) -> list[bytes]:
    """The values in partition 0 of ``topic``, as a read_committed reader sees them (a value
    of None as b""), read until a poll brings nothing for 0.3 s."""
    with log.consumer(isolation="read_committed") as reader:
        reader.assign([TopicPartition(topic, 0)])
        got: list[bytes] = []
        while batch := reader.poll(timeout=0.3):
            got += [r.value or b"" for r in batch]
        return got


def stop_when(app: App, event: threading.Event, after_s: float = 0.3) -> None:
    """Stop ``app`` (as SIGTERM does) ``after_s`` seconds after ``event`` is set, from a thread
    of its own (30 s at most for the event)."""

    def stop() -> None:
        event.wait(30)
        time.sleep(after_s)
        app.stop()

    threading.Thread(target=stop, daemon=True).start()
