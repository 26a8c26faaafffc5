"""Operating a log from the shell, on either backend, with kcat's flags: ``topic``, ``produce``,
``consume`` and ``group``."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from assured.errors import (
    AssuredError,
    ConfigError,
    DeliveryError,
    EngineFileError,
    RecordTooLargeError,
    UnknownTopicError,
    UsageError,
)
from assured.log import (
    DEFAULT_LOG_URL,
    Consumer,
    Log,
    Record,
    TopicPartition,
    Watermarks,
    open_log,
)
from assured.log._models import encode_headers
from assured.log._open import parse_log_url
from assured.log._protocol import Producer, check_consumer_options

__all__ = ["consume", "group_app", "produce", "topic_app"]

err = Console(stderr=True, soft_wrap=True)  # an error is one line, however long
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


def _open(url: str, pairs: list[str], *, create: bool = False) -> Log:
    """The log at ``url``. Only commands that make a log pass ``create``: for every other one
    a missing engine file is a wrong path, said as such, and no file is made."""
    return open_log(url, _settings(pairs) or None, create=create)


def exit_code(e: AssuredError) -> int:
    """2: the command named or asked for something wrong (a flag, a URL, a missing file,
    topic, partition or group, a record over the limit); 1: the log or its data failed."""
    return 2 if isinstance(e, ConfigError | UsageError | UnknownTopicError) else 1


def fail(message: str, code: int = 2) -> NoReturn:
    """Say ``message`` in one line on stderr and exit with ``code``."""
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """A user's mistake is one line and exit 2; a failure of the log is one line and exit 1."""
    try:
        yield
    except AssuredError as e:
        fail(str(e), exit_code(e))
    except sqlite3.Error as e:  # a damaged page met where no check looked: still one line
        fail(
            f"the engine file could not be read ({e}); it may be corrupt: restore it from a "
            "copy, or move it aside and start a new one",
            1,
        )


def _unescape(flag: str, text: str) -> bytes:
    """kcat's backslash escapes (\\n, \\t, \\x1f, ...) in a flag's value, as bytes."""
    try:
        return text.encode().decode("unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        raise ConfigError(f"{flag} '{text}': a bad backslash escape ({e.reason})") from None


def _check_file(lg: Log, topics: list[str]) -> None:
    """An engine file is checked before anything is written to it: its pages, and the record
    batches of ``topics``. Kafka brokers look after their own files."""
    from assured.log.embedded import EmbeddedLog

    if isinstance(lg, EmbeddedLog):
        try:
            lg.check(topics)
        except EngineFileError as e:
            raise EngineFileError(f"refusing to write to {lg.path}: {e}") from None


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
    """Create a topic (and, on the embedded engine, the log file if it is new)."""
    with _errors():
        settings = _settings(config)
        if parse_log_url(log).scheme == "embedded":  # a refused topic makes no new file
            from assured.log.embedded._engine import check_new_topic

            check_new_topic(name, partitions, settings)
        lg = _open(log, x, create=True)
        _check_file(lg, [])
        with lg.admin() as admin:
            admin.create_topic(name, partitions, settings)
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
    partition: int | None = typer.Option(None, "--partition", "-p", min=0),
    key: str | None = typer.Option(None, "--key", "-k", help="One key for every record."),
    key_delimiter: str | None = typer.Option(
        None, "-K", help="Split each line at the first DELIM into key and value."
    ),
    header: list[str] = typer.Option([], "--header", "-H", help="name=value, repeatable."),
    file: Path | None = typer.Option(None, "--file", "-l", help="Read lines from FILE."),
    delimiter: str = typer.Option(
        "\\n",
        "-D",
        help="Record delimiter; backslash escapes (\\n, \\t, \\x00) as kcat reads them.",
    ),
    transactional: bool = typer.Option(False, "--transactional", help="All lines, or none."),
    x: list[str] = XOPT,
) -> None:
    """Send each line of stdin (or --file) as a record, as ``kcat -P`` does. The log file and
    the topic must exist (``assured topic create``). A record the log refuses (one over the
    size limit, say) stops the command: the lines before it were produced, none after (with
    --transactional, none at all)."""
    with _errors():
        if key is not None and key_delimiter is not None:
            raise ConfigError("-k and -K exclude each other")
        kd = _unescape("-K", key_delimiter) if key_delimiter is not None else None
        if kd == b"":
            raise ConfigError("-K '': the key delimiter must not be empty")
        sep = _unescape("-D", delimiter)
        if not sep:
            raise ConfigError("-D '': the record delimiter must not be empty")
        headers = []
        for h in header:
            name, eq, text = h.partition("=")
            if not eq or not name:
                raise ConfigError(f"-H {h!r}: expected name=value")
            headers.append((name, text.encode()))
        raw = _read_input(file)
        lines = raw.split(sep)
        if lines and lines[-1] == b"":
            lines.pop()
        records = [_record(line, key.encode() if key is not None else None, kd) for line in lines]
        lg = _open(log, x)
        limit = _check_target(lg, topic, partition)
        if limit is not None:
            _check_sizes(records, headers, topic, limit)
        producer = lg.producer(
            transactional_id=f"assured-cli-{time.time_ns()}" if transactional else None
        )
        with producer:
            done = _send_all(
                producer, topic, iter(records), len(records), headers, partition, transactional
            )
    err.print(f"produced {done} record(s) to {topic}")


def _read_input(file: Path | None) -> bytes:
    if file is None:
        return sys.stdin.buffer.read()
    try:
        return file.read_bytes()
    except OSError as e:
        raise ConfigError(f"-l {str(file)!r}: cannot read it ({e.strerror})") from None


def _check_target(lg: Log, topic: str, partition: int | None) -> int | None:
    """The topic (and partition) exist, and an engine file is sound, before a record is sent:
    nothing is written to a file that is damaged, or for a topic that is not there. Returns
    the topic's record size limit, if it says one."""
    from assured.log.embedded import EmbeddedLog

    if isinstance(lg, EmbeddedLog) and lg.settings.auto_create_topics:
        _check_file(lg, [])
        return None  # the producer makes the topic at its first record
    with lg.admin() as admin:
        desc = admin.describe_topic(topic)
    if partition is not None and partition >= desc.partitions:
        raise UnknownTopicError(
            f"topic {topic!r} has partitions 0..{desc.partitions - 1}; there is no partition "
            f"{partition}"
        )
    _check_file(lg, [topic])
    limit = desc.config.get("max.message.bytes", "")
    return int(limit) if limit.isdigit() else None


def _check_sizes(
    records: list[tuple[bytes | None, bytes]],
    headers: list[tuple[str, bytes]],
    topic: str,
    limit: int,
) -> None:
    """Every record under the topic's limit, or none is sent (the log would refuse it, and
    the lines before it would be in)."""
    extra = len(encode_headers(headers) or b"")
    for n, (k, value) in enumerate(records, 1):
        size = len(k or b"") + len(value) + extra
        if size > limit:
            raise RecordTooLargeError(
                f"line {n}: record of {size} bytes for topic {topic!r} is over the limit of "
                f"{limit} bytes (its max.message.bytes); nothing was produced"
            )


def _record(line: bytes, key: bytes | None, kd: bytes | None) -> tuple[bytes | None, bytes]:
    if kd is not None and kd in line:
        k, value = line.split(kd, 1)
        return k, value
    return key, line


def _send_all(
    producer: Producer,
    topic: str,
    records: Iterator[tuple[bytes | None, bytes]],
    total: int,
    headers: list[tuple[str, bytes]],
    partition: int | None,
    transactional: bool,
) -> int:
    """Send every record and wait for the log; returns how many landed, or exits saying how
    far it got. A transactional producer writes all of them or none."""
    failures: list[str] = []
    if transactional:
        producer.init_transactions()
        producer.begin_transaction()
    show = total >= 10_000 and err.is_terminal  # a bar only for long work, on a tty
    sent = 0
    try:
        with Progress(console=err, transient=True, disable=not show) as bar:
            task = bar.add_task(f"producing to {topic}", total=total)
            for k, value in records:
                producer.send(
                    topic,
                    value,
                    key=k,
                    headers=headers or None,
                    partition=partition,
                    on_delivery=lambda r: failures.append(str(r.error)) if r.error else None,
                )
                sent += 1
                if sent % 1000 == 0:
                    bar.update(task, completed=sent)
    except AssuredError as e:
        if transactional:
            with contextlib.suppress(AssuredError):
                producer.abort_transaction()
            kept = "nothing was produced (the transaction was aborted)"
        else:
            with contextlib.suppress(AssuredError):
                producer.flush(60)
            kept = f"the {sent} line(s) before it were produced, none after"
        fail(f"line {sent + 1}: {e} ({kept})", exit_code(e))
    if transactional:
        producer.commit_transaction()
    try:
        remaining = producer.flush(60)
    except DeliveryError as e:  # records the callbacks were not told of (still queued)
        failures.append(str(e))
        remaining = e.failed
    if failures or remaining:
        raise DeliveryError(
            f"{len(failures) + remaining} of {sent} record(s) not delivered: {failures[0]}"
            if failures
            else f"{remaining} of {sent} record(s) not delivered"
        )
    return sent


# -- consume -----------------------------------------------------------------------------------


def _fmt(text: bytes, r: Record) -> bytes:
    """kcat's format tokens: %t %p %o %k %s %T %h %K %S in ``text`` (escapes already read)."""
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


def _offset(offset: str, group: str | None) -> str | int:
    """``-o``, checked before anything is opened."""
    if offset in ("beginning", "end", "stored"):
        if offset == "stored" and group is None:
            raise ConfigError("-o stored reads a group's committed offsets: give the group, -G")
        return offset
    try:
        return int(offset)
    except ValueError:
        raise ConfigError(f"-o {offset!r}: beginning, end, stored, N or -N") from None


def _start(offset: str | int, tp: TopicPartition, w: Watermarks, committed: int | None) -> int:
    if offset == "beginning":
        return w.low
    if offset == "end":
        return w.high
    if offset == "stored":
        return committed if committed is not None else w.low
    assert isinstance(offset, int)
    if offset < 0:
        return max(w.low, w.high + offset)
    if offset > w.high:  # as kcat: wait at the end for records to come
        err.print(
            f"-o {offset} is past the end of {tp.topic} [{tp.partition}] (next offset "
            f"{w.high}): reading from the end"
        )
        return w.high
    return max(w.low, offset)


def consume(
    topic: str = typer.Option(..., "--topic", "-t"),
    log: str = LOG,
    group: str | None = typer.Option(None, "--group", "-G", help="Join this consumer group."),
    partition: int | None = typer.Option(None, "--partition", "-p", min=0),
    offset: str = typer.Option(
        "beginning",
        "--offset",
        "-o",
        help="beginning, end, stored (needs -G), N or -N (N from the end). An N past the end "
        "starts at the end, as kcat does: it waits there for new records, or with -e exits "
        "at once.",
    ),
    exit_at_end: bool = typer.Option(False, "-e", help="Exit at the end of the partitions."),
    count: int | None = typer.Option(None, "--count", "-c", min=1),
    fmt: str = typer.Option("%s\\n", "--format", "-f", help="kcat tokens: %t %p %o %k %s %T %h"),
    as_json: bool = typer.Option(False, "-J", help="One JSON envelope per record."),
    isolation: str = typer.Option("read_committed", "--isolation"),
    x: list[str] = XOPT,
) -> None:
    """Print records, as ``kcat -C`` does. With -G, commits what it printed. The log file and
    the topic must exist; nothing is created."""
    with _errors():
        check_consumer_options(isolation, "earliest")
        start_at = _offset(offset, group)
        template = _unescape("-f", fmt)
        lg = _open(log, x)
        with lg.admin() as admin:
            n = admin.describe_topic(topic).partitions
            if partition is not None and partition >= n:
                raise UnknownTopicError(
                    f"topic {topic!r} has partitions 0..{n - 1}; there is no partition {partition}"
                )
            parts = [
                TopicPartition(topic, p) for p in (range(n) if partition is None else [partition])
            ]
            ends = {tp: admin.watermarks(tp) for tp in parts}
        with lg.consumer(group_id=group, isolation=isolation) as consumer:  # type: ignore[arg-type]
            if group is not None and partition is None and start_at == "stored":
                consumer.subscribe([topic])
            else:
                consumer.assign(parts)
                committed = consumer.committed(parts) if group is not None else dict.fromkeys(parts)
                for tp in parts:
                    consumer.seek(tp, _start(start_at, tp, ends[tp], committed[tp]))
            seen = _print_records(
                consumer, ends, template, as_json, count, exit_at_end, isolation, group is not None
            )
    err.print(f"consumed {seen} record(s)")


def _print_records(
    consumer: Consumer,
    ends: dict[TopicPartition, Watermarks],
    template: bytes,
    as_json: bool,
    count: int | None,
    exit_at_end: bool,
    isolation: str,
    grouped: bool,
) -> int:
    """Print until ``count`` records, the end (with -e), or Ctrl-C; commit what was printed
    when in a group."""
    sink = sys.stdout.buffer
    seen = 0
    printed: dict[TopicPartition, int] = {}
    stop_at = {tp: (w.lso if isolation == "read_committed" else w.high) for tp, w in ends.items()}
    quiet = 0.0
    try:
        while count is None or seen < count:
            batch = consumer.poll(max_records=500, timeout=0.5)
            for r in batch[: None if count is None else count - seen]:
                sink.write(_json(r) if as_json else _fmt(template, r))
                printed[r.tp] = r.offset + 1
                seen += 1
            sink.flush()
            if printed and grouped:
                consumer.commit(printed)  # what was printed, not what was fetched
            if exit_at_end:
                quiet = 0.0 if batch else quiet + 0.5
                at_end = all(consumer.position(tp) >= stop_at[tp] for tp in consumer.assignment())
                if (at_end and not batch) or quiet >= 3.0:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if grouped and printed:
            with contextlib.suppress(AssuredError):
                consumer.commit(printed)
    return seen


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
        if group not in admin.list_groups():
            raise ConfigError(
                f"consumer group {group!r} does not exist; `assured group list` shows those that do"
            )
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
