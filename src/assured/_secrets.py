"""Which settings are secret, and how to show a setting, a URL or a text without them.

One place decides it for every surface: the Kafka clients' errors and log lines, the App's
settings (repr, str, ``model_dump``), start-up lines, CLI output and audit reports."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

__all__ = ["MASK", "SECRET_KEYS", "Scrubber", "is_secret", "redact_config", "redact_url"]

MASK = "***"
# Setting names whose values must never be shown: passwords, keys, tokens, JAAS/OIDC configs
# (librdkafka's ``sasl.password``, ``ssl.key.pem``, ``sasl.oauthbearer.client.secret``, ...;
# libpq's ``password``).
SECRET_KEYS = re.compile(
    r"password|passwd|secret|\.key($|\.pem)|token|jaas|oauthbearer\.config|pem$|credential",
    re.IGNORECASE,
)


def is_secret(key: str) -> bool:
    return bool(SECRET_KEYS.search(key))


def redact_config(config: Mapping[str, object]) -> dict[str, object]:
    """``config`` with every secret value replaced by ``***``."""
    return {k: (MASK if is_secret(k) else v) for k, v in config.items()}


def redact_url(url: str) -> str:
    """``url`` with the password of its user info and secret query values replaced by ``***``
    (``postgresql://app:***@db/pay``, ``kafka://b:9092?sasl.password=***``); the rest of it is
    left exactly as written."""
    head, mark, query = url.partition("?")
    scheme, sep, rest = head.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        user, at, host = authority.rpartition("@")
        if at and ":" in user:
            authority = f"{user.split(':', 1)[0]}:{MASK}@{host}"
        head = f"{scheme}{sep}{authority}{slash}{path}"
    if mark:
        pairs = []
        for pair in query.split("&"):
            key, eq, _ = pair.partition("=")
            pairs.append(f"{key}={MASK}" if eq and is_secret(unquote(key)) else pair)
        query = "&".join(pairs)
    return f"{head}{mark}{query}"


class Scrubber:
    """Replaces every secret value of a config (and any ``extra`` secret) with ``***`` in
    text."""

    def __init__(self, config: Mapping[str, object], extra: Iterable[str] = ()):
        values = {str(v) for k, v in config.items() if is_secret(k) and str(v)}
        values.update(s for s in extra if s)
        self._secrets = sorted(values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def config(self, config: Mapping[str, object]) -> dict[str, object]:
        return redact_config(config)
