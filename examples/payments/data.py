"""Charges for the audit: ``--input charges=examples.payments.data:charges``. Some accounts
run dry, so some charges are refused."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from examples.payments.app import ACCOUNTS


def charges(n: int = 300, seed: int = 5) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(n):
        account = f"acct-{rng.randrange(ACCOUNTS):02d}"
        charge = {"id": f"ch-{i:05d}", "account": account, "cents": rng.randrange(500, 9_000)}
        yield {"key": account, "value": charge}
