"""Answer open long polls at once when the server is told to stop, under any ASGI server.

ASGI has no "shutting down" message before the server drains its connections, so a long
poll would hold shutdown for up to a minute. At start-up the app chains its own step in
front of the SIGTERM/SIGINT handlers the server installed (uvicorn's, say): on a signal it
wakes every waiting long poll with an empty answer, then lets the server's handler run.
"""

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signal(act: Callable[[], None]) -> Callable[[], None]:
    """Run `act` on the event loop when a stop signal arrives; returns the undo.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(act)
        before = previous[signal.Signals(signum)]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:  # nobody else handles it: do what it would have done
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in SIGNALS:
        signal.signal(sig, handler)

    def undo() -> None:
        for sig, before in previous.items():
            signal.signal(sig, before)

    return undo
