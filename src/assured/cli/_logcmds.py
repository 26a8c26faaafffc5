"""Operating a log from the shell, on either backend, with kcat's flags: ``topic``, ``produce``,
``consume`` and ``group``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from assured.errors import AssuredError, ConfigError, DeliveryError, UnknownTopicError, UsageError
from assured.log import DEFAULT_LOG_URL, Log, Record, TopicPartition, open_log
from assured.log._protocol import check_consumer_options

__all__ = ["consume", "group_app", "produce", "topic_app"]

err = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)
F = TypeVar("F", bound=Callable[..., Any])

LOG = typer.Option(DEFAULT_LOG_URL, "--log", "-b", envvar="ASSURED_LOG", help="Log URL.")
XOPT = typer.Option([], "-X", help="A backend setting, key=value (librdkafka's names on Kafka).")


def _settings(pairs: list[str]) -> dict[str, str]:
    out_: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"-X {pair!r}: expected key=value")
        out_[key] = value
    return out_


def _open(url: str, pairs: list[str]) -> Log:
    return open_log(url, _settings(pairs) or None)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """A user's mistake is one line and exit 2; a failure of the log is one line and exit 1."""
    try:
        yield
    except (ConfigError, UsageError, UnknownTopicError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    except AssuredError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None


# -- topics ------------------------------------------------------------------------------------

topic_app = typer.Typer(help="Create, list, describe and delete topics.", no_args_is_help=True)


@topic_app.command("create")
def topic_create(
    name: str,
    partitions: int = typer.Option(1, "--partitions", "-p", min=1),
    config: list[str] = typer.Option([], "--config", "-c", help="Topic config, key=value."),
    log: str = LOG,
    x: list[str] = XOPT,
) -> None:
    """Create a topic."""
    with _errors(), _open(log, x).admin() as admin:
        admin.create_topic(name, partitions, _settings(config))
    err.print(f"created {name} ({partitions} partition{'s' * (partitions != 1)})")


@topic_app.command("list")
def topic_list(log: str = LOG, x: list[str] = XOPT) -> None:
    """List topics, one per line."""
    with _errors(), _open(log, x).admin() as admin:
        for name in admin.list_topics():
            print(name)


@topic_app.command("describe")
def topic_describe(name: str, log: str = LOG, x: list[str] = XOPT) -> None:
    """Partitions with their watermarks, and the topic's configs."""
    with _errors(), _open(log, x).admin() as admin:
        desc = admin.describe_topic(name)
        table = Table(title=f"{name}: {desc.partitions} partitions")
        for column in ("partition", "low", "high", "lso", "records"):
            table.add_column(column, justify="right")
        for p in range(desc.partitions):
            w = admin.watermarks(TopicPartition(name, p))
            table.add_row(str(p), str(w.low), str(w.high), str(w.lso), str(w.high - w.low))
    out.print(table)
    for key in sorted(desc.config):
        out.print(f"{key}={desc.config[key]}")


@topic_app.command("delete")
def topic_delete(name: str, log: str = LOG, x: list[str] = XOPT) -> None:
    """Delete a topic and its records."""
    with _errors(), _open(log, x).admin() as admin:
        admin.delete_topic(name)
    err.print(f"deleted {name}")


# -- produce -----------------------------------------------------------------------------------


def produce(
    topic: str = typer.Option(..., "--topic", "-t"),
    log: str = LOG,
    partition: int | None = typer.Option(None, "--partition", "-p"),
    key: str | None = typer.Option(None, "--key", "-k", help="One key for every record."),
    key_delimiter: str | None = typer.Option(
        None, "-K", help="Split each line at the first DELIM into key and value."
    ),
    header: list[str] = typer.Option([], "--header", "-H", help="name=value, repeatable."),
    file: Path | None = typer.Option(None, "--file", "-l", help="Read lines from FILE."),
    delimiter: str = typer.Option("\n", "-D", help="Record delimiter (default: newline)."),
    transactional: bool = typer.Option(False, "--transactional", help="All lines, or none."),
    x: list[str] = XOPT,
) -> None:
    """Send each line of stdin (or --file) as a record, as ``kcat -P`` does."""
    if key is not None and key_delimiter is not None:
        err.print("[red]error:[/red] -k and -K exclude each other")
        raise typer.Exit(2)
    headers = []
    for h in header:
        name, eq, text = h.partition("=")
        if not eq:
            err.print(f"[red]error:[/red] -H {h!r}: expected name=value")
            raise typer.Exit(2)
        headers.append((name, text.encode()))
    raw = file.read_bytes() if file is not None else sys.stdin.buffer.read()
    sep = delimiter.encode().decode("unicode_escape").encode()
    lines = raw.split(sep)
    if lines and lines[-1] == b"":
        lines.pop()
    failures: list[str] = []
    with _errors():
        lg = _open(log, x)
        producer = lg.producer(
            transactional_id=f"assured-cli-{time.time_ns()}" if transactional else None
        )
        if transactional:
            producer.init_transactions()
            producer.begin_transaction()
        show = len(lines) >= 10_000 and err.is_terminal  # a bar only for long work, on a tty
        bar = Progress(console=err, transient=True, disable=not show)
        task = bar.add_task(f"producing to {topic}", total=len(lines))
        bar.start()
        for n, line in enumerate(lines, 1):
            if n % 1000 == 0:
                bar.update(task, completed=n)
            k: bytes | None = key.encode() if key is not None else None
            value: bytes = line
            if key_delimiter is not None:
                kd = key_delimiter.encode()
                if kd in line:
                    k, value = line.split(kd, 1)
            producer.send(
                topic,
                value,
                key=k,
                headers=headers or None,
                partition=partition,
                on_delivery=lambda r: failures.append(str(r.error)) if r.error else None,
            )
        bar.stop()
        if transactional:
            producer.commit_transaction()
        try:
            remaining = producer.flush(60)
        except DeliveryError as e:  # records the callbacks were not told of (still queued)
            failures.append(str(e))
            remaining = e.failed
        producer.close()
    if failures or remaining:
        err.print(
            f"[red]error:[/red] {len(failures) + remaining} record(s) not delivered: {failures[:1]}"
        )
        raise typer.Exit(1)
    err.print(f"produced {len(lines)} record(s) to {topic}")


# -- consume -----------------------------------------------------------------------------------


def _fmt(fmt: str, r: Record) -> bytes:
    """kcat's format tokens: %t %p %o %k %s %T %h %K %S, and \\n \\t escapes."""
    fields: dict[str, bytes] = {
        "t": r.topic.encode(),
        "p": str(r.partition).encode(),
        "o": str(r.offset).encode(),
        "k": r.key or b"",
        "s": r.value or b"",
        "T": str(r.timestamp_ms).encode(),
        "h": b",".join(k.encode() + b"=" + (v or b"") for k, v in r.headers),
        "K": str(len(r.key) if r.key is not None else -1).encode(),
        "S": str(len(r.value) if r.value is not None else -1).encode(),
        "%": b"%",
    }
    text = fmt.encode().decode("unicode_escape").encode("latin-1")
    result = bytearray()
    i = 0
    while i < len(text):
        if text[i : i + 1] == b"%" and i + 1 < len(text):
            token = chr(text[i + 1])
            if token in fields:
                result += fields[token]
                i += 2
                continue
        result += text[i : i + 1]
        i += 1
    return bytes(result)


def _json(r: Record) -> bytes:
    def text(b: bytes | None) -> str | None:
        return None if b is None else b.decode("utf-8", errors="replace")

    headers: list[str | None] = []
    for k, v in r.headers:
        headers += [k, text(v)]
    envelope = {
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "tstype": "create",
        "ts": r.timestamp_ms,
        "headers": headers,
        "key": text(r.key),
        "payload": text(r.value),
    }
    return json.dumps(envelope).encode() + b"\n"


def _start(offset: str, low: int, high: int, committed: int | None) -> int:
    if offset == "beginning":
        return low
    if offset == "end":
        return high
    if offset == "stored":
        return committed if committed is not None else low
    try:
        n = int(offset)
    except ValueError:
        raise ConfigError(f"-o {offset!r}: beginning, end, stored, N or -N") from None
    return max(low, high + n) if n < 0 else n


def consume(
    topic: str = typer.Option(..., "--topic", "-t"),
    log: str = LOG,
    group: str | None = typer.Option(None, "--group", "-G", help="Join this consumer group."),
    partition: int | None = typer.Option(None, "--partition", "-p"),
    offset: str = typer.Option("beginning", "--offset", "-o"),
    exit_at_end: bool = typer.Option(False, "-e", help="Exit at the end of the partitions."),
    count: int | None = typer.Option(None, "--count", "-c", min=1),
    fmt: str = typer.Option("%s\\n", "--format", "-f", help="kcat tokens: %t %p %o %k %s %T %h"),
    as_json: bool = typer.Option(False, "-J", help="One JSON envelope per record."),
    isolation: str = typer.Option("read_committed", "--isolation"),
    x: list[str] = XOPT,
) -> None:
    """Print records, as ``kcat -C`` does. With -G, commits what it printed."""
    with _errors():
        check_consumer_options(isolation, "earliest")
    sink = sys.stdout.buffer
    seen = 0
    printed: dict[TopicPartition, int] = {}
    with _errors():
        lg = _open(log, x)
        with lg.admin() as admin:
            n = admin.describe_topic(topic).partitions
            parts = [
                TopicPartition(topic, p) for p in (range(n) if partition is None else [partition])
            ]
            ends = {tp: admin.watermarks(tp) for tp in parts}
        consumer = lg.consumer(group_id=group, isolation=isolation)  # type: ignore[arg-type]
        starts: dict[TopicPartition, int] = {}
        if group is not None and partition is None and offset == "stored":
            consumer.subscribe([topic])
        else:
            consumer.assign(parts)
            committed = consumer.committed(parts) if group is not None else dict.fromkeys(parts)
            for tp in parts:
                w = ends[tp]
                starts[tp] = _start(offset, w.low, w.high, committed[tp])
                consumer.seek(tp, starts[tp])
        stop_at = {
            tp: (w.lso if isolation == "read_committed" else w.high) for tp, w in ends.items()
        }
        quiet = 0.0
        try:
            while count is None or seen < count:
                batch = consumer.poll(max_records=500, timeout=0.5)
                for r in batch[: None if count is None else count - seen]:
                    sink.write(_json(r) if as_json else _fmt(fmt, r))
                    printed[r.tp] = r.offset + 1
                    seen += 1
                sink.flush()
                if printed and group is not None:
                    consumer.commit(printed)  # what was printed, not what was fetched
                if exit_at_end:
                    quiet = 0.0 if batch else quiet + 0.5
                    at_end = all(
                        consumer.position(tp) >= stop_at[tp] for tp in consumer.assignment()
                    )
                    if (at_end and not batch) or quiet >= 3.0:
                        break
        except KeyboardInterrupt:
            pass
        finally:
            if group is not None and printed:
                with contextlib.suppress(AssuredError):
                    consumer.commit(printed)
            consumer.close()
    err.print(f"consumed {seen} record(s)")


# -- groups ------------------------------------------------------------------------------------

group_app = typer.Typer(
    help="Consumer groups: members, assignment, offsets, lag.", no_args_is_help=True
)


@group_app.command("list")
def group_list(log: str = LOG, x: list[str] = XOPT) -> None:
    """List consumer groups."""
    with _errors(), _open(log, x).admin() as admin:
        for g in admin.list_groups():
            print(g)


@group_app.command("describe")
def group_describe(
    group: str, log: str = LOG, x: list[str] = XOPT, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Members and their partitions; committed offset and lag per partition."""
    with _errors(), _open(log, x).admin() as admin:
        desc = admin.describe_group(group)
        lag = admin.lag(group)
    if as_json:
        print(
            json.dumps(
                {
                    "group": group,
                    "state": desc.state,
                    "members": [
                        {
                            "member": m.member_id,
                            "client": m.client_id,
                            "partitions": [list(tp) for tp in m.assignment],
                        }
                        for m in desc.members
                    ],
                    "partitions": [
                        {
                            "topic": p.tp.topic,
                            "partition": p.tp.partition,
                            "committed": p.committed,
                            "high": p.high,
                            "lag": p.lag,
                        }
                        for p in lag
                    ],
                }
            )
        )
        return
    out.print(f"group {group}: {desc.state}, {len(desc.members)} member(s)")
    members = Table(title="members")
    for column in ("member", "client", "partitions"):
        members.add_column(column)
    for m in desc.members:
        members.add_row(m.member_id, m.client_id, ", ".join(str(tp) for tp in m.assignment))
    out.print(members)
    offsets = Table(title="offsets")
    for column in ("topic", "partition", "committed", "high", "lag"):
        offsets.add_column(column, justify="right" if column != "topic" else "left")
    for p in lag:
        committed = "-" if p.committed is None else str(p.committed)
        offsets.add_row(p.tp.topic, str(p.tp.partition), committed, str(p.high), str(p.lag))
    out.print(offsets)
