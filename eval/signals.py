"""Signal handlers for a block of code: the one place unconfuse installs them (graceful stops, forwarding to
launched processes)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def installed_handlers(handler) -> Iterator[bool]:
    """``handler`` for SIGTERM and SIGINT for the block's duration, the previous handlers restored after; yields
    whether it was installed (signal handlers can only be set on the main thread: elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield True
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
