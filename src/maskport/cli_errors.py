"""How every ``maskport`` command reports a failure: one line on stderr and an exit code, never a traceback
(``maskport --debug ...`` re-raises instead, for the traceback).

- maskport's typed errors (:class:`maskport.errors.MaskportError`) -> ``error: <message>``, their ``exit_code``
  (2: could not run; 1: a gate failed);
- ``OSError`` (a missing file, a full disk) and Ctrl-C -> ``error: <type>: <message>``, exit 2.
"""

from __future__ import annotations

import functools
import sys

import click

from .errors import MaskportError


def one_line_errors(fn=None, *, first_line_only: bool = False):
    """Decorate a click command callback. ``first_line_only``: print only the first line of a multi-line message
    (verify's errors may quote a whole sample record)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            ctx = click.get_current_context(silent=True)
            debug = bool(ctx.find_root().params.get("debug", False)) if ctx is not None else False
            try:
                return fn(*args, **kwargs)
            except MaskportError as exc:
                if debug:
                    raise
                msg = str(exc) or type(exc).__name__
                if first_line_only:
                    msg = msg.splitlines()[0]
                click.echo(f"error: {msg}", err=True)
                sys.exit(exc.exit_code)
            except (OSError, KeyboardInterrupt) as exc:
                if debug:
                    raise
                click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
                sys.exit(2)

        return wrapper

    return decorate(fn) if fn is not None else decorate
