"""The README's "Testing your App" pattern, written as the README tells users to write it."""

from __future__ import annotations

from pathlib import Path

from assured import App, Message, Output, TopicPartition, open_log
from assured.log import Log


def make_app(log: Log) -> App:
    """The README's charge handler, given the test's log."""
    app = App(log=log, group="payments", guarantee="exactly-once")

    @app.handler("charges", output="receipts", value_codec="json", retries=3)
    def charge(msg: Message, out: Output) -> None:
        out.send({"charge": msg.value["id"], "ok": True}, key=msg.key)

    return app


def test_charge(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("charges", 1)
        admin.create_topic("receipts", 1)
    with log.producer() as producer:
        producer.send("charges", b'{"id": 7}', key=b"acct-1")
    app = make_app(log)  # your App, given the test's log
    app.run(until_idle=0.5)
    with log.consumer(isolation="read_committed") as consumer:
        consumer.assign([TopicPartition("receipts", 0)])
        assert [r.value for r in consumer.poll(timeout=1)] == [b'{"charge":7,"ok":true}']
