"""A real Apache Kafka broker, or a three-node KRaft cluster, on free loopback ports.

The broker comes from Maven Central as jars (``tools/kafka/pom.xml``), cached under
``~/.cache/assured/kafka/`` so a second start needs no network. Each node runs as combined
broker+controller (KRaft), with transactions on. Used by the test suite's session fixtures and
by ``make kafka-up`` / ``make kafka-down``::

    python -m assured.testing.kafka up --nodes 3 --dir .kafka     # prints BOOTSTRAP=...
    python -m assured.testing.kafka kill --dir .kafka --node 2    # SIGKILL one broker
    python -m assured.testing.kafka restart --dir .kafka --node 2
    python -m assured.testing.kafka down --dir .kafka

Processes run in their own session, so they outlive the command that started them; their ids
(and start times, so a reused pid is never signalled) are kept in ``DIR/cluster.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil

from assured.errors import HarnessError
from assured.testing._net import free_ports, port_open, wait_for_port

__all__ = ["KafkaCluster", "ensure_jars", "find_tools_dir"]

KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
TOOLS_ENV = "ASSURED_KAFKA_TOOLS"
STATE_FILE = "cluster.json"

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def find_tools_dir() -> Path:
    """The folder holding the broker's ``pom.xml``: ``$ASSURED_KAFKA_TOOLS`` or ``tools/kafka``
    of the checkout this package runs from (or of the working directory)."""
    env = os.environ.get(TOOLS_ENV)
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "tools" / "kafka" for p in here.parents]
    candidates += [p / "tools" / "kafka" for p in (Path.cwd(), *Path.cwd().parents)]
    for c in candidates:
        if (c / "pom.xml").is_file():
            return c
    raise HarnessError(
        "cannot find tools/kafka/pom.xml, which lists the Kafka broker's jars. "
        f"Run from an assured checkout, or set {TOOLS_ENV} to the folder that holds pom.xml."
    )


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "assured" / "kafka"


def ensure_jars(tools_dir: Path | None = None, cache_root: Path | None = None) -> Path:
    """The broker's classpath folder, fetched with Maven on first use and cached by pom hash."""
    tools_dir = tools_dir or find_tools_dir()
    pom = tools_dir / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
    target = (cache_root or _cache_root()) / digest / "jars"
    if (target / ".complete").is_file():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise HarnessError(
            "Maven (mvn) is not on PATH; it fetches the Kafka broker's jars from Maven Central. "
            "Install it (apt-get install maven) and try again."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="jars-", dir=target.parent))
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom),
        "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise HarnessError(
            f"Maven could not fetch the Kafka broker's jars (exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-2000:]}\n"
            "Check that Maven Central is reachable; a later run retries."
        )
    (staging / ".complete").write_text(digest)
    if target.exists():  # another process won the race; theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(target)
    return target


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise HarnessError("Java is not installed (the Kafka broker needs Java 17 or newer).")
    return java


def _cluster_id() -> str:
    # Kafka's format: the 16 bytes of a UUID, URL-safe base64 without padding, not led by '-'.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


@dataclass
class BrokerNode:
    """One KRaft node (broker and controller in one JVM)."""

    node_id: int
    port: int
    controller_port: int
    dir: str
    pid: int | None = None
    started_at: float | None = None  # see _started: to tell a reused pid apart

    @property
    def config_path(self) -> Path:
        return Path(self.dir) / "server.properties"

    @property
    def log_path(self) -> Path:
        return Path(self.dir) / "broker.log"

    def process(self) -> psutil.Process | None:
        """The live JVM of this node, or None."""
        if self.pid is None:
            return None
        try:
            p = psutil.Process(self.pid)
            if self.started_at is not None:
                started = _started(self.pid)
                if started is None or abs(started - self.started_at) > 1:
                    return None
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _started(pid: int) -> float | None:
    """When process ``pid`` started: on Linux in seconds since boot, read from /proc, which a
    step of the wall clock leaves alone (psutil's create_time moves with it: a clock stepped
    13 s mid-run made a live broker look gone, so it was never stopped); elsewhere psutil's
    create_time. None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            after_name = stat.read().rsplit(b")", 1)[1].split()
        return int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
    except FileNotFoundError:
        return None if sys.platform.startswith("linux") else _create_time(pid)
    except (OSError, ValueError, IndexError):
        return _create_time(pid)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass
class KafkaCluster:
    """``nodes`` Kafka brokers on loopback, under ``workdir``. Use as a context manager, or
    ``start()`` / ``stop()``. ``kill(node)`` and ``restart(node)`` serve fault tests."""

    workdir: Path
    nodes: int = 1
    heap: str = "1g"  # the JVM starts at 512m: below that Kafka's log cleaner risks OOM
    extra_config: Mapping[str, str] = field(default_factory=dict)
    tools_dir: Path | None = None
    members: list[BrokerNode] = field(default_factory=list)
    _children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> Self:
        if self.nodes not in (1, 3):
            raise HarnessError(f"nodes must be 1 or 3, not {self.nodes}")
        jars = ensure_jars(self.tools_dir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * self.nodes)
        self.members = [
            BrokerNode(i + 1, ports[2 * i], ports[2 * i + 1], str(self.workdir / f"node{i + 1}"))
            for i in range(self.nodes)
        ]
        (self.workdir / "log4j2.properties").write_text(_LOG4J2)
        cid = _cluster_id()
        formatters = []
        for node in self.members:
            Path(node.dir).mkdir(parents=True, exist_ok=True)
            node.config_path.write_text(self._server_properties(node))
            cmd = [_java(), "-Xmx256m", "-cp", f"{jars}/*", STORAGE_TOOL, "format"]
            cmd += ["-t", cid, "-c", str(node.config_path)]
            with node.log_path.open("ab") as log:
                formatters.append((node, subprocess.Popen(cmd, stdout=log, stderr=log)))
        for node, fmt in formatters:
            if fmt.wait(timeout=120) != 0:
                raise HarnessError(
                    f"formatting Kafka node {node.node_id}'s storage failed:\n{node.log_tail()}"
                )
        deadline = time.monotonic() + timeout
        try:
            for node in self.members:  # start all before waiting: a lone node has no quorum
                self._launch(node, jars)
            self._save()
            for node in self.members:
                self._wait_ready(node, deadline)
            self._wait_brokers(deadline)
        except BaseException:
            self.stop(timeout=5)
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every node (a controlled shutdown), then SIGKILL what is left after
        ``timeout`` seconds."""
        procs = [p for p in (n.process() for n in self.members) if p is not None]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        for child in self._children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)
        self._children.clear()
        for n in self.members:
            n.pid = n.started_at = None
        if (self.workdir / STATE_FILE).exists():
            self._save()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------------

    def kill(self, node_id: int) -> None:
        """SIGKILL one broker, as a machine crash would."""
        node = self._node(node_id)
        proc = node.process()
        if proc is None:
            raise HarnessError(f"Kafka node {node_id} is not running")
        proc.kill()
        proc.wait(timeout=10)
        child = self._children.pop(node_id, None)
        if child is not None:
            child.wait(timeout=5)
        node.pid = node.started_at = None
        self._save()

    def restart(self, node_id: int, timeout: float = 60.0) -> None:
        """Start a killed broker again, on its old ports and data (never re-formatted)."""
        node = self._node(node_id)
        if node.process() is not None:
            raise HarnessError(f"Kafka node {node_id} is still running; kill it first")
        self._launch(node, ensure_jars(self.tools_dir))
        self._save()
        deadline = time.monotonic() + timeout
        self._wait_ready(node, deadline)
        self._wait_brokers(deadline)

    # -- facts -------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.members)

    def running(self) -> list[int]:
        return [n.node_id for n in self.members if n.process() is not None]

    @classmethod
    def attach(cls, workdir: Path) -> KafkaCluster:
        """The cluster an earlier ``start()`` (maybe in another process) left under ``workdir``."""
        try:
            state: dict[str, Any] = json.loads((workdir / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise HarnessError(f"no Kafka cluster state in {workdir}: {e}") from e
        members = [BrokerNode(**m) for m in state["members"]]
        return cls(workdir=workdir, nodes=len(members), members=members)

    # -- internals ---------------------------------------------------------------------------

    def _node(self, node_id: int) -> BrokerNode:
        for n in self.members:
            if n.node_id == node_id:
                return n
        raise HarnessError(
            f"no Kafka node {node_id}; nodes are {[n.node_id for n in self.members]}"
        )

    def _launch(self, node: BrokerNode, jars: Path) -> None:
        cmd = [
            _java(),
            "-Xms512m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{jars}/*",
            KAFKA_MAIN,
            str(node.config_path),
        ]
        with node.log_path.open("ab") as log:
            child = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._children[node.node_id] = child
        node.pid = child.pid
        node.started_at = _started(child.pid)

    def _wait_ready(self, node: BrokerNode, deadline: float) -> None:
        while time.monotonic() < deadline:
            if node.process() is None:
                raise HarnessError(
                    f"Kafka node {node.node_id} exited while starting; "
                    f"its log ({node.log_path}) ends with:\n{node.log_tail()}"
                )
            if wait_for_port(node.port, min(deadline, time.monotonic() + 1.0)):
                return
        raise HarnessError(
            f"Kafka node {node.node_id} did not open port {node.port} in time; "
            f"its log ({node.log_path}) ends with:\n{node.log_tail()}"
        )

    def _wait_brokers(self, deadline: float) -> None:
        """Until the metadata every client sees lists every running broker."""
        from confluent_kafka.admin import AdminClient

        want = {n.node_id for n in self.members if n.process() is not None}
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        seen: set[int] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                seen = set(admin.list_topics(timeout=2).brokers)
                if want <= seen:
                    return
            time.sleep(0.3)
        raise HarnessError(f"Kafka cluster saw brokers {sorted(seen)}, wanted {sorted(want)}")

    def _server_properties(self, node: BrokerNode) -> str:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.members)
        replicas = str(self.nodes)
        min_isr = "2" if self.nodes >= 3 else "1"
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(Path(node.dir) / "data"),
            "num.partitions": "1",
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": "0",
            # Crash tests use short session timeouts, so a killed member leaves in seconds.
            "group.min.session.timeout.ms": "500",
            # As serious clusters run: a typo in a topic name is an error, not a new topic.
            "auto.create.topics.enable": "false",
            # A crashed transactional producer's open transaction is aborted promptly once it
            # times out, so tests of that path take seconds, not minutes.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
        }
        props.update(self.extra_config)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _save(self) -> None:
        state = {"members": [asdict(n) for n in self.members]}
        tmp = self.workdir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.workdir / STATE_FILE)


# -- command line ------------------------------------------------------------------------------


@contextlib.contextmanager
def _harness_errors() -> Iterator[None]:
    try:
        yield
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _up(workdir: Path, nodes: int, timeout: float) -> int:
    if (workdir / STATE_FILE).exists():
        old = KafkaCluster.attach(workdir)
        if old.running():
            if old.nodes != nodes:
                raise HarnessError(
                    f"a {old.nodes}-node cluster already runs from {workdir}; "
                    "stop it first (make kafka-down)"
                )
            print(f"BOOTSTRAP={old.bootstrap}")
            return 0
        shutil.rmtree(workdir)
    started = time.monotonic()
    cluster = KafkaCluster(workdir=workdir, nodes=nodes).start(timeout=timeout)
    took = time.monotonic() - started
    print(f"{nodes} Kafka node(s) ready in {took:.1f}s; logs in {workdir}", file=sys.stderr)
    print(f"BOOTSTRAP={cluster.bootstrap}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m assured.testing.kafka",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status", "kill", "restart"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=Path(".kafka"), help="state folder")
        if name == "up":
            p.add_argument("--nodes", type=int, default=1, choices=(1, 3))
            p.add_argument("--timeout", type=float, default=120.0)
        if name in ("kill", "restart"):
            p.add_argument("--node", type=int, required=True)
    args = parser.parse_args(argv)
    workdir: Path = args.dir.resolve()

    with _harness_errors():
        if args.command == "up":
            return _up(workdir, args.nodes, args.timeout)
        if not (workdir / STATE_FILE).exists() and args.command in ("down", "status"):
            print(f"no Kafka cluster in {workdir}", file=sys.stderr)
            return 0 if args.command == "down" else 1
        cluster = KafkaCluster.attach(workdir)
        if args.command == "down":
            cluster.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"stopped; removed {workdir}", file=sys.stderr)
        elif args.command == "status":
            up = cluster.running()
            for n in cluster.members:
                state = "up" if n.node_id in up and port_open(n.port) else "down"
                print(f"node {n.node_id}: 127.0.0.1:{n.port} {state}")
            print(f"BOOTSTRAP={cluster.bootstrap}")
            return 0 if up else 1
        elif args.command == "kill":
            cluster.kill(args.node)
        else:
            cluster.restart(args.node)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
