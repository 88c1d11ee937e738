"""Threads a command started in the background are stopped before the process exits.

A thread still running native code while the interpreter is torn down can abort the process ("terminate called
without an active exception", SIGABRT) after a clean one-line error; :func:`register_stopper` records how to stop
one, and the CLI's entry point calls :func:`stop_background_threads` before it exits.
"""

from __future__ import annotations

_STOPPERS: list = []


def register_stopper(fn) -> None:
    """``fn()`` is called before the process exits (e.g. a background hash: stop reading, join the thread)."""
    _STOPPERS.append(fn)


def stop_background_threads() -> None:
    """Call every registered stopper once (newest first); errors in them are ignored."""
    while _STOPPERS:
        fn = _STOPPERS.pop()
        try:
            fn()
        except Exception:  # noqa: BLE001
            pass


__all__ = ["register_stopper", "stop_background_threads"]
