"""Helpers for testing code that uses assured, and for assured's own tests.

- :class:`~assured.testing.AppTest`: your App, in-process, on an embedded log of its own (send,
  run until idle, read outputs, positions, dead letters and the sink's rows); the pytest
  plugin's ``assured_test`` and ``assured_app`` fixtures make them.
- :class:`~assured.testing.kafka.KafkaCluster`: a real Apache Kafka broker or three-node KRaft
  cluster on loopback, with ``kill`` / ``restart`` of one broker for fault tests.
- :class:`~assured.testing.postgres.PostgresServer`: a throwaway PostgreSQL server.

Nothing here is a stand-in: both start the real server. Imports are lazy so that
``python -m assured.testing.kafka`` runs its module only once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from assured.testing.app import AppTest, Received
    from assured.testing.kafka import KafkaCluster
    from assured.testing.postgres import PostgresServer

__all__ = ["AppTest", "KafkaCluster", "PostgresServer", "Received"]


def __getattr__(name: str) -> Any:
    if name in ("AppTest", "Received"):
        from assured.testing import app

        return getattr(app, name)
    if name == "KafkaCluster":
        from assured.testing.kafka import KafkaCluster

        return KafkaCluster
    if name == "PostgresServer":
        from assured.testing.postgres import PostgresServer

        return PostgresServer
    raise AttributeError(f"module 'assured.testing' has no attribute {name!r}")
