"""A harness that cannot start its service says why, instead of hanging or skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

from assured.errors import HarnessError
from assured.testing.kafka import KafkaCluster, ensure_jars, find_tools_dir
from assured.testing.postgres import PostgresServer


def test_missing_pom_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASSURED_KAFKA_TOOLS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    # The checkout's own tools/kafka is still found through this package's path...
    assert (find_tools_dir() / "pom.xml").is_file()
    # ...but a cache miss with no Maven says what to install.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HarnessError, match=r"Maven \(mvn\) is not on PATH"):
        ensure_jars(cache_root=tmp_path / "empty-cache")


def test_cached_jars_need_no_maven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first = ensure_jars()  # fetches, or finds the cache
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn, no network tools at all
    assert ensure_jars() == first
    assert any(first.glob("kafka_2.13-*.jar"))
    assert any(first.glob("log4j-slf4j*-impl-*.jar")), (
        "the slf4j→log4j2 binding is on the classpath"
    )


def test_only_one_or_three_nodes(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="nodes must be 1 or 3"):
        KafkaCluster(workdir=tmp_path, nodes=2).start()


def test_postgres_without_server_programs_says_how_to_install(tmp_path: Path) -> None:
    server = PostgresServer(workdir=tmp_path, bin_dir=tmp_path / "nowhere")
    with pytest.raises(HarnessError, match="initdb failed"):
        server.start(timeout=10)


def test_bad_broker_setting_fails_with_kafkas_own_words(tmp_path: Path) -> None:
    cluster = KafkaCluster(workdir=tmp_path, extra_config={"num.io.threads": "not-a-number"})
    with pytest.raises(HarnessError, match=r"storage failed[\s\S]*value not-a-number"):
        cluster.start(timeout=60)
    assert cluster.running() == []


def test_kafka_node_that_dies_at_start_shows_its_log(tmp_path: Path) -> None:
    cluster = KafkaCluster(workdir=tmp_path, heap="1k")  # the JVM refuses -Xms512m -Xmx1k
    with pytest.raises(HarnessError, match=r"exited while starting[\s\S]*heap"):
        cluster.start(timeout=60)
    assert cluster.running() == []


def test_a_nodes_start_is_told_by_the_time_since_boot_not_the_wall_clock() -> None:
    """A node's process is known by its pid and when it started, so a pid reused later is not
    taken for it. That start used to be psutil's create_time, which moves with the wall
    clock: a clock stepped 13 s mid-run made a live broker look gone (no broker to pause, and
    its JVM left running at the end). It is read from /proc now, in seconds since boot."""
    import subprocess
    import sys
    import time

    from assured.testing.kafka import BrokerNode, _started

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = _started(child.pid)
        assert started is not None
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started  # not moved by clock steps
        assert 0 <= age < 10
        node = BrokerNode(1, 0, 0, "", pid=child.pid, started_at=started)
        assert node.process() is not None
        node.started_at = started - 5  # another process that had this pid
        assert node.process() is None
    finally:
        child.kill()
        child.wait()
    assert _started(child.pid) is None
