"""Every error assured raises, in one tree.

Errors carry their nature as class attributes, so code that retries asks the type, not a table
of codes::

    AssuredError            anything assured raises on purpose
    ├── ConfigError         a URL, setting or name is wrong: nothing was written; fix the input
    └── ServiceError        a service assured starts or talks to could not be used
        └── HarnessError    a test/dev Kafka broker or PostgreSQL failed to start or stop

``retriable``: the same call may succeed if tried again (within a deadline).
``fatal``: this instance must stop; retrying would be wrong.

Messages say what happened, what was kept safe, and what to do next.
"""

from __future__ import annotations

__all__ = ["AssuredError", "ConfigError", "HarnessError", "ServiceError"]


class AssuredError(Exception):
    """Base of every error assured raises on purpose."""

    retriable: bool = False
    fatal: bool = False


class ConfigError(AssuredError, ValueError):
    """A URL, setting or name is invalid. Nothing was written; fix the input and try again."""

    fatal = True


class ServiceError(AssuredError):
    """A service assured starts or talks to could not be used."""


class HarnessError(ServiceError):
    """A local Kafka broker or PostgreSQL server for tests or development failed to start or stop.

    The message names the step that failed and the log file to read.
    """

    fatal = True
