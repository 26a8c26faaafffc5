"""Every error assured raises, in one tree.

Errors carry their nature as class attributes, so code that retries asks the type, not a table
of codes (``if err.retriable: ...``)::

    AssuredError                    anything assured raises on purpose
    ├── ConfigError                 a URL, setting or name is wrong: nothing was written; fix it
    │   ├── InvalidTopicError       a topic name breaks Kafka's rules, or collides with another
    │   └── RecordTooLargeError     a record over the size limit; it was not written
    ├── LogError                    the log refused or failed an operation
    │   ├── UnknownTopicError       no such topic (or partition); create it first
    │   ├── RetriableError          retriable: busy or unavailable for now; retry within a deadline
    │   ├── DeliveryError           records queued without a delivery callback were not written
    │   ├── AbortableError          abortable: abort the open transaction, rewind, go on
    │   │   ├── TransactionTimedOutError   the log aborted it for running past its timeout
    │   │   └── StaleGenerationError       fenced: the group moved on (rebalance); rejoin
    │   └── FatalError              fatal: this producer or consumer can't go on; close it
    │       ├── ProducerFencedError fenced: a newer instance owns this transactional id; stop
    │       └── SequenceError       the idempotent producer's sequence broke
    ├── UsageError                  a call out of order (send outside a transaction; after close)
    ├── EngineFileError             an embedded engine file is not one, is corrupt, is too new,
    │                               or its folder is missing or read-only; the file is untouched
    └── ServiceError                a service assured starts or talks to could not be used
        └── HarnessError            a test/dev Kafka broker or PostgreSQL failed to start or stop

Natures:

``retriable``
    The same call may succeed if tried again. Retry inside a deadline, never forever.
``abortable``
    A transaction is open and can no longer commit: abort it, seek back to the committed
    positions, and carry on. Nothing the transaction wrote becomes visible.
``fenced``
    Another instance has taken over (newer producer epoch, newer group generation). The fenced
    one must not write or commit as if it still owned its partitions.
``fatal``
    This instance must stop; retrying would be wrong.

Messages say what happened, what was kept safe, and what to do next.
"""

from __future__ import annotations

__all__ = [
    "AbortableError",
    "AssuredError",
    "ConfigError",
    "DeliveryError",
    "EngineFileError",
    "FatalError",
    "HarnessError",
    "InvalidTopicError",
    "LogError",
    "ProducerFencedError",
    "RecordTooLargeError",
    "RetriableError",
    "SequenceError",
    "ServiceError",
    "StaleGenerationError",
    "TransactionTimedOutError",
    "UnknownTopicError",
    "UsageError",
]


class AssuredError(Exception):
    """Base of every error assured raises on purpose."""

    retriable: bool = False
    abortable: bool = False
    fenced: bool = False
    fatal: bool = False


class ConfigError(AssuredError, ValueError):
    """A URL, setting or name is invalid. Nothing was written; fix the input and try again."""


class InvalidTopicError(ConfigError):
    """A topic name breaks Kafka's rules (1-249 of ``[a-zA-Z0-9._-]``, not ``.`` or ``..``)
    or collides with an existing topic once ``.`` and ``_`` are treated alike."""


class RecordTooLargeError(ConfigError):
    """A record is over the producer's or the topic's size limit. It was not written."""


class LogError(AssuredError):
    """The log (embedded engine or Kafka) refused or failed an operation."""


class UnknownTopicError(LogError):
    """The topic or partition does not exist. Create it first (or enable auto-creation)."""


class DeliveryError(LogError):
    """Records sent without a delivery callback were not written (a delivery timeout, a record
    the broker refused, an authorization error). Raised by ``flush()``, once, for the failures
    since the previous ``flush()``: nobody else was told. ``failed`` counts them; ``errors`` holds
    the distinct errors. No position may be committed past those records."""

    def __init__(self, message: str, failed: int = 0, errors: tuple[AssuredError, ...] = ()):
        super().__init__(message)
        self.failed = failed
        self.errors = errors

    @property
    def retriable(self) -> bool:  # type: ignore[override]
        """True when every failure was retriable (timeouts, a broker away): send them again."""
        return bool(self.errors) and all(e.retriable for e in self.errors)


class RetriableError(LogError):
    """Busy or unavailable for now; the same call may succeed within a deadline."""

    retriable = True


class AbortableError(LogError):
    """The open transaction can no longer commit: abort it, rewind to the committed positions,
    and carry on. Nothing it wrote becomes visible to read_committed readers."""

    abortable = True


class TransactionTimedOutError(AbortableError):
    """The transaction ran past its timeout and the log aborted it."""


class StaleGenerationError(AbortableError):
    """A commit carried an old consumer-group generation: the group rebalanced, and these
    partitions may belong to another member now. Nothing was committed; rejoin the group."""

    fenced = True


class FatalError(LogError):
    """This producer or consumer cannot go on; close it."""

    fatal = True


class ProducerFencedError(FatalError):
    """A newer producer with the same transactional id has started (its ``init_transactions``
    bumped the epoch). This one is a zombie: it must stop; its open transaction was aborted."""

    fenced = True


class SequenceError(FatalError):
    """The idempotent producer's per-partition sequence broke; records may be out of order."""


class UsageError(AssuredError, RuntimeError):
    """An API call out of order: ``send`` outside a transaction on a transactional producer,
    ``commit_transaction`` with none open, a client used after ``close()``. A bug to fix in the
    calling code; nothing was written."""


class EngineFileError(AssuredError):
    """An embedded engine file cannot be used: it is not an engine file, it is corrupt, a newer
    assured wrote it, or its folder is missing or read-only. The file was not modified."""

    fatal = True


class ServiceError(AssuredError):
    """A service assured starts or talks to could not be used."""


class HarnessError(ServiceError):
    """A local Kafka broker or PostgreSQL server for tests or development failed to start or stop.

    The message names the step that failed and the log file to read.
    """

    fatal = True
