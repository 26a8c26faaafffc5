"""Orders for the audit: ``--input orders=examples.receipts.data:orders``."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any


def orders(n: int = 300, seed: int = 11) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(n):
        lines = [
            {"sku": f"sku-{rng.randrange(40):02d}", "cents": rng.randrange(99, 9_999),
             "quantity": rng.randrange(1, 4)}
            for _ in range(rng.randrange(1, 5))
        ]  # fmt: skip
        customer = f"customer-{rng.randrange(25):02d}"
        yield {"key": customer, "value": {"order_id": f"o-{i:05d}", "lines": lines}}
