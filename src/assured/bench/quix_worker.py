"""The Quix Streams side of the runtime benchmark, run as a script by the Python of a virtualenv
that has ``quixstreams`` (it pins an older confluent-kafka than assured does, so the two never
share one environment). It imports nothing from assured:

    .venv-quix/bin/python quix_worker.py 'JSON spec'

Same work and same clock as :mod:`assured.bench._workers`: upper-case each value, same key, to
the output topic; timed from the first record to the end of ``Application.run``. Prints one
JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile

try:
    from assured.bench._outside import Clock, version
except ImportError:  # run as a script in Quix's virtualenv: this folder is on sys.path
    from _outside import Clock, version  # type: ignore[import-not-found,no-redef]


def main(argv: list[str]) -> int:
    from quixstreams import Application  # type: ignore[import-not-found]

    spec = json.loads(argv[0])
    records = spec["records"]
    clock = Clock()

    def upper(value: bytes) -> bytes:
        clock.tick()  # Quix reports no count of its own; this costs it ~50 ns a record
        return value.upper()

    with tempfile.TemporaryDirectory(prefix="quix-state-") as state_dir:
        app = Application(
            broker_address=spec["bootstrap"],
            consumer_group=spec["group"],
            auto_offset_reset="earliest",
            commit_interval=spec["commit_interval_ms"] / 1000,
            commit_every=0,  # by time only, as every other system here
            processing_guarantee=spec["guarantee"],
            state_dir=state_dir,
            loglevel="WARNING",
            auto_create_topics=False,
        )
        source = app.topic(spec["input"], key_deserializer="bytes", value_deserializer="bytes")
        sink = app.topic(spec["output"], key_serializer="bytes", value_serializer="bytes")
        app.dataframe(source).apply(upper).to_topic(sink)
        if spec.get("idle_s"):
            app.run(timeout=spec["idle_s"], collect=False)
        else:
            app.run(count=records, collect=False)
    print(json.dumps(clock.result(quixstreams_version=version("quixstreams"))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
