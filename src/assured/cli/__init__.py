"""The ``assured`` command."""

from assured.cli._app import app, main

__all__ = ["app", "main"]
