"""The runtime: handlers run under a chosen delivery guarantee.

Each guarantee is one small commit protocol in ``assured.runtime.protocols``:
at-most-once commits before handling, at-least-once after, exactly-once commits outputs and
positions in one transaction (Kafka's, or the sink database's).
"""

from assured.runtime._app import App, RunStats
from assured.runtime._handling import HandlerFailedError, Output
from assured.runtime._message import CODECS, Codec, DecodeError, Message
from assured.runtime._settings import GUARANTEES, AppSettings, Guarantee

__all__ = [
    "CODECS",
    "GUARANTEES",
    "App",
    "AppSettings",
    "Codec",
    "DecodeError",
    "Guarantee",
    "HandlerFailedError",
    "Message",
    "Output",
    "RunStats",
]
