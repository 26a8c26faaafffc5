"""Secrets never surface: not in an App's settings (repr, str, model_dump, model_dump_json), not
in a ConfigError, not in the audit's output, JSON or report files; while the real values still
reach librdkafka and psycopg.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from assured import App
from assured._secrets import redact_url
from assured.cli import app as cli
from assured.errors import ConfigError
from assured.log import open_log
from assured.runtime import AppSettings

# Every kind of secret librdkafka and libpq take, each with its own value. Each ends in a tail
# that is not hex, so that a random topic name (t-<hex>) in the output never holds it.
SECRET_CONFIG = {
    "sasl.password": "pw-sasl-1w2x",
    "ssl.key.password": "pw-sslkey-3y4z",
    "ssl.keystore.password": "pw-keystore-5u6v",
    "ssl.key.pem": "-----BEGIN PRIVATE KEY-----pem-7g8h",
    "ssl.certificate.pem": "cert-pem-9i0j",
    "sasl.oauthbearer.client.secret": "oauth-secret-k1l2",
    "sasl.oauthbearer.config": "principal=me token=tok-m3n4",
    "sasl.oauthbearer.token.endpoint.url": "https://idp/token?x=tokurl-o5p6",
}
URL_SECRET = "pw-in-url-q7r8"
# The secrets a PLAINTEXT client accepts and ignores (the PEM ones it would try to parse).
SECRET_CONFIG_USABLE = {
    k: v for k, v in SECRET_CONFIG.items() if not k.endswith(".pem") and "oauthbearer" not in k
}
PUBLIC = {"security.protocol": "SASL_SSL", "sasl.username": "alice"}


def _settings(**extra: object) -> AppSettings:
    return AppSettings(
        log=f"kafka://broker-1:9092,broker-2:9092?sasl.password={URL_SECRET}",
        log_config={**SECRET_CONFIG, **PUBLIC},
        **extra,
    )


def _assert_clean(text: str) -> None:
    for secret in [*SECRET_CONFIG.values(), URL_SECRET]:
        assert secret not in text
        # Nor a telling part of one (a secret cut at a quote or a space).
        assert secret.split("-")[-1] not in text, secret


def test_settings_show_no_secret_anywhere() -> None:
    s = _settings()
    for shown in (
        repr(s),
        str(s),
        f"{s}",
        str(s.model_dump()),
        str(s.model_dump(mode="json")),
        s.model_dump_json(),
        json.dumps(s.model_dump()),
        repr(App(log=s.log, log_config=s.log_config).settings),
    ):
        _assert_clean(shown)
        assert "***" in shown
        # What is not secret stays readable: a settings dump is for debugging.
        assert "broker-1:9092" in shown
        assert "SASL_SSL" in shown
        assert "alice" in shown


def test_the_real_values_are_kept_for_the_clients() -> None:
    s = _settings()
    assert s.log_config["sasl.password"] == SECRET_CONFIG["sasl.password"]
    assert s.log_config["ssl.key.pem"] == SECRET_CONFIG["ssl.key.pem"]
    assert URL_SECRET in s.log
    # And the log the App would open gets them: its config holds the real password.
    log = open_log(s.log, s.log_config)
    assert log._config["sasl.password"] == SECRET_CONFIG["sasl.password"]  # type: ignore[attr-defined]
    _assert_clean(repr(log))


def test_a_config_error_names_the_setting_not_its_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError) as bad_value:
        App(
            log="embedded:///tmp/never-created.db",
            log_config={"sasl.password": [SECRET_CONFIG["sasl.password"]]},
        )
    assert "log_config.sasl.password" in str(bad_value.value)
    _assert_clean(str(bad_value.value))

    monkeypatch.setenv("ASSURED_LOG_CONFIG", json.dumps({"ssl.key.password": {"x": 1}}))
    with pytest.raises(ConfigError) as from_env:
        AppSettings()
    assert "ssl.key.password" in str(from_env.value)
    _assert_clean(str(from_env.value))
    monkeypatch.delenv("ASSURED_LOG_CONFIG")

    # Not JSON at all: said, without the text it could not read.
    broken = '{"sasl.password": "' + SECRET_CONFIG["sasl.password"] + '"'
    monkeypatch.setenv("ASSURED_LOG_CONFIG", broken)
    with pytest.raises(ConfigError, match="JSON object") as not_json:
        AppSettings()
    _assert_clean(str(not_json.value))
    monkeypatch.delenv("ASSURED_LOG_CONFIG")

    # An error in another setting, with secrets given alongside, shows none of them.
    with pytest.raises(ConfigError) as other:
        _settings(commit_every=0)
    assert "commit_every" in str(other.value)
    _assert_clean(str(other.value))


@pytest.mark.parametrize(
    "url",
    [
        f"kafka://?sasl.password={URL_SECRET}",
        f"kafka://h:99999?sasl.password={URL_SECRET}",
        f"kafka://u:{URL_SECRET}@h:9092/path",
        f"embedded:/x?sasl.password={URL_SECRET}",
        f"ftp://u:{URL_SECRET}@h",
    ],
)
def test_a_bad_log_url_is_refused_without_its_secret(url: str) -> None:
    with pytest.raises(ConfigError) as bad:
        open_log(url)
    _assert_clean(str(bad.value))
    assert "***" in str(bad.value)


def test_redact_url() -> None:
    assert redact_url("postgresql://app:s3cret@db:5432/pay?sslmode=require") == (
        "postgresql://app:***@db:5432/pay?sslmode=require"
    )
    assert redact_url("kafka://b:9092?sasl.password=x&acks=all") == (
        "kafka://b:9092?sasl.password=***&acks=all"
    )
    assert redact_url("embedded:///tmp/a.db") == "embedded:///tmp/a.db"


@pytest.mark.kafka
@pytest.mark.postgres
def test_audit_output_json_and_report_show_no_secret(
    kafka_bootstrap: str, postgres_dsn: str, tmp_path: Path
) -> None:
    """The audit on Kafka into PostgreSQL, with a password in the log URL and in the DSN (the
    test server trusts local connections, so both are carried but unused)."""
    dsn = postgres_dsn.replace("postgres@", f"postgres:{URL_SECRET}x@", 1)
    assert dsn != postgres_dsn
    report = tmp_path / "report"
    result = CliRunner().invoke(
        cli,
        [
            "audit",
            "-b", f"kafka://{kafka_bootstrap}?sasl.password={URL_SECRET}",
            "--guarantee", "exactly-once",
            "--sink", "postgres",
            "--postgres-dsn", dsn,
            "--messages", "40",
            "--kills", "0",
            "--json",
            "--report", str(report),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["verdict"] == "pass"
    assert rows[0]["sent"] == 40
    assert rows[0]["log"].endswith("?sasl.password=***")
    _assert_clean(result.output)
    written = sorted(p for p in report.rglob("*") if p.is_file())
    assert any(p.name == "audit.json" for p in written)
    for path in written:
        _assert_clean(path.read_bytes().decode("utf-8", "replace"))


@pytest.mark.kafka
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_assured_run_says_everything_but_the_secrets(kafka_bootstrap: str, fmt: str) -> None:
    """``assured run`` of a real App at debug level: its start line (with the log URL), its
    assignment, commit and stop lines, as text and as JSON; no secret in any of it."""
    from tests.conftest import create_topic

    source, sink = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    with open_log(f"kafka://{kafka_bootstrap}").producer() as producer:
        for i in range(20):
            producer.send(source, b"v%d" % i, key=b"k%d" % i)
        producer.flush()
    env = {
        **os.environ,
        "COPIER_IN": source,
        "COPIER_OUT": sink,
        "ASSURED_GUARANTEE": "exactly-once",
        "ASSURED_GROUP": f"secrets-{fmt}",
        "ASSURED_LOG_CONFIG": json.dumps(SECRET_CONFIG_USABLE),
    }
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "assured"),
            "run", "copier:app",
            "-b", f"kafka://{kafka_bootstrap}?sasl.password={URL_SECRET}",
            "--until-idle", "1", "--log-level", "debug", "--log-format", fmt,
        ],
        cwd=Path(__file__).parents[1] / "apps",
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-2000:]
    start = next(line for line in said.splitlines() if "exactly-once" in line)
    assert f"kafka://{kafka_bootstrap}" in start  # the start line names the log
    assert "20 record(s)" in said
    _assert_clean(said)
