"""``python -m examples.receipts``: the receipts App audited under crashes."""

from examples._run import audit

ARGS = ["--app", "examples.receipts.app:app", "--input", "orders=examples.receipts.data:orders",
        "--effects-topic", "receipts", "--id-field", "order_id"]  # fmt: skip

raise SystemExit(audit(*ARGS))
