"""assured's pytest plugin (registered by installing assured): fixtures for testing an App.

- ``assured_test``: a factory; ``assured_test(app, partitions=1)`` is an
  :class:`~assured.testing.AppTest`, closed when the test ends.
- ``assured_app``: an ``AppTest`` of the App named in the pytest configuration,
  ``assured_app = "payments.service:app"`` (in ``[tool.pytest.ini_options]`` or pytest.ini).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from assured.testing.app import AppTest

__all__ = ["assured_app", "assured_test"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "assured_app",
        "The App the assured_app fixture tests, as module:attribute (payments.service:app).",
        default="",
    )


@pytest.fixture
def assured_test() -> Iterator[Callable[..., AppTest]]:
    made: list[AppTest] = []

    def make(app: Any, partitions: int = 1) -> AppTest:
        test = AppTest(app, partitions=partitions)
        made.append(test)
        return test

    yield make
    for test in reversed(made):
        test.close()


@pytest.fixture
def assured_app(request: pytest.FixtureRequest) -> Iterator[AppTest]:
    from assured.runtime import App

    target = str(request.config.getini("assured_app") or "")
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        pytest.fail(
            "the assured_app fixture needs the App to test: set assured_app = "
            '"module:attribute" (for example "payments.service:app") in [tool.pytest.ini_options] '
            "or pytest.ini, or use assured_test(app) instead",
            pytrace=False,
        )
    try:
        app = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"assured_app = {target!r}: {e}", pytrace=False)
    if not isinstance(app, App):
        pytest.fail(
            f"assured_app = {target!r} is a {type(app).__name__}, not an App", pytrace=False
        )
    with AppTest(app) as test:
        yield test
