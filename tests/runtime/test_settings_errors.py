"""A settings mistake is never silent and never a traceback's worth of text: one ConfigError
line naming the setting, where it came from (argument, ASSURED_* variable or TOML file) and what
is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from assured import App
from assured.errors import ConfigError
from assured.runtime import AppSettings


def one_line(e: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_a_missing_config_file_is_an_error_not_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as given:
        AppSettings(config_file=str(missing))
    assert "nope.toml" in one_line(given)
    assert "does not exist" in one_line(given)
    monkeypatch.setenv("ASSURED_CONFIG_FILE", str(missing))
    with pytest.raises(ConfigError) as from_env:
        App(log=f"embedded://{tmp_path}/a.db")
    assert "ASSURED_CONFIG_FILE" in one_line(from_env)


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("comit_every = 3\n", ["unknown setting 'comit_every'", "'commit_every'", "app.toml"]),
        ("commit_every = \n", ["app.toml", "not valid TOML", "line 1"]),
        ('commit_every = "often"\n', ["commit_every", "app.toml", "valid integer"]),
        ('guarantee = "twice"\n', ["guarantee", "app.toml", "exactly-once"]),
        (b"group = '\xff'\n", ["app.toml", "not valid TOML"]),
    ],
)
def test_a_bad_config_file_names_itself_and_the_setting(
    tmp_path: Path, toml: str | bytes, says: list[str]
) -> None:
    path = tmp_path / "app.toml"
    if isinstance(toml, bytes):
        path.write_bytes(toml)
    else:
        path.write_text(toml)
    with pytest.raises(ConfigError) as bad:
        AppSettings(config_file=str(path))
    for word in says:
        assert word in one_line(bad)


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [
        ("ASSURED_COMMIT_INTERVAL_MS", "fast", "commit_interval_ms = 'fast' (from ASSURED_COMMIT"),
        ("ASSURED_METRICS_PORT", "99999", "less than or equal to 65535"),
        ("ASSURED_GUARANTEE", "twice", "guarantee = 'twice' (from ASSURED_GUARANTEE)"),
        ("ASSURED_MISSING_SINK_OFFSETS", "latest", "'fail', 'committed' or 'earliest'"),
    ],
)
def test_a_bad_environment_value_is_named_with_its_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str, value: str, says: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as bad:
        App(log=f"embedded://{tmp_path}/a.db")
    text = one_line(bad)
    assert text.startswith("invalid App settings: ")
    assert says in text


def test_an_unknown_argument_suggests_the_known_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad:
        App(log=f"embedded://{tmp_path}/a.db", sesion_timeout_ms=3000)
    assert "unknown setting 'sesion_timeout_ms' (did you mean 'session_timeout_ms'?)" in one_line(
        bad
    )


def test_an_empty_group_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad:
        App(log=f"embedded://{tmp_path}/a.db", group="")
    assert "group = ''" in one_line(bad)


def test_every_setting_is_described() -> None:
    for name, field in AppSettings.model_fields.items():
        assert field.description, name
