"""What ``import assured`` promises is really there."""

from __future__ import annotations

import importlib

import pytest

import assured
import assured.errors


@pytest.mark.parametrize(
    "module",
    ["assured", "assured.log", "assured.errors", "assured.testing", "assured.log.embedded"],
)
def test_every_exported_name_exists(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{module}.{name}"


def test_errors_carry_their_nature() -> None:
    assert issubclass(assured.ConfigError, ValueError)
    assert not assured.ConfigError.retriable
    assert assured.errors.ProducerFencedError.fatal
    assert assured.errors.ProducerFencedError.fenced
    assert assured.errors.StaleGenerationError.abortable
    assert not assured.errors.StaleGenerationError.fatal
    assert assured.errors.RetriableError.retriable
    assert issubclass(assured.HarnessError, assured.AssuredError)
