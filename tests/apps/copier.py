"""A copier App for crash tests, run as a process of its own (``python copier.py``).

Configured from the environment: ``ASSURED_*`` for the App (log, group, guarantee, timeouts),
``COPIER_IN`` and ``COPIER_OUT`` for the topics, ``COPIER_DELAY_MS`` for the work per record."""

import os
import time

from assured import App, Message, Output

app = App()
DELAY_S = float(os.environ.get("COPIER_DELAY_MS", "0")) / 1000


@app.handler(os.environ["COPIER_IN"], output=os.environ["COPIER_OUT"])
def copy(msg: Message, out: Output) -> None:
    time.sleep(DELAY_S)
    out.send(msg.value, key=msg.key)


if __name__ == "__main__":
    app.run()
