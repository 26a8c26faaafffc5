"""Deliberately broken commit protocols, to show the audit catches what it exists to catch.

Armed only by ``ASSURED_AUDIT_PLANT`` in a processor's environment (tests do this):

- ``commit-before-handle``: calls itself at-least-once but commits before handling (that is
  at-most-once), so a crash loses records the guarantee promised to keep;
- ``offsets-outside-transaction``: calls itself exactly-once but commits the consumer offsets
  directly, outside the transaction, so an aborted transaction's input is skipped.
"""

from __future__ import annotations

from collections.abc import Callable

from assured.log import Record
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import CommitProtocol, Runtime, next_offsets
from assured.runtime.protocols.at_most_once import AtMostOnce
from assured.runtime.protocols.exactly_once import ExactlyOnce

__all__ = ["PLANTS", "planted"]


class CommitsBeforeHandling(AtMostOnce):
    guarantee = "at-least-once"

    def process(self, records: list[Record]) -> None:
        self.rt.consumer.commit(next_offsets(records))
        crash_point("after-handle-before-commit")  # where at-least-once would be weakest
        self.rt.handle(records, self.producer)
        self.producer.flush()


class OffsetsOutsideTransaction(ExactlyOnce):
    def commit(self) -> None:
        if self.open and self.pending:
            self.rt.consumer.commit(self.pending)  # the bug: not part of the transaction
            self.pending.clear()
        super().commit()


PLANTS: dict[str, Callable[[Runtime], CommitProtocol]] = {
    "commit-before-handle": CommitsBeforeHandling,
    "offsets-outside-transaction": OffsetsOutsideTransaction,
}


def planted(name: str) -> Callable[[Runtime], CommitProtocol]:
    try:
        return PLANTS[name]
    except KeyError:
        raise ValueError(f"unknown planted bug {name!r}; known: {sorted(PLANTS)}") from None
