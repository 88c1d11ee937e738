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
from .io.exit import stop_background_threads


def os_error_line(exc: BaseException) -> str:
    """One line for an ``OSError``: a full disk names the file and says what to do."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return (f"no space left on the device{where}; free space (or choose another -o) and rerun "
                f"(nothing was written in place of the output)")
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return f"file too large for the output's file system or the process's file size limit: {exc.filename or exc}"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror or 'permission denied'}: {exc.filename or exc}"
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return f"file name too long: {str(exc.filename or '')[:120]}..."
    return f"{type(exc).__name__}: {exc}"


def entry() -> None:
    """The ``maskport`` console script: run the click group, then leave without running interpreter teardown
    when a command failed. Native libraries (torch's thread pools, tokenizers, a hashing thread still blocked in
    a read) may abort the process while it is torn down ("terminate called without an active exception",
    SIGABRT, exit 134) after the one-line error was printed; streams are flushed and ``os._exit`` ends the
    process with the intended code instead."""
    import os

    from .cli import main

    code = 0
    try:
        rv = main(standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # a usage error: one line too (click's own shows usage + "Error:")
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        code = 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        code = 2
    finally:
        stop_background_threads()
    if code:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)
    sys.exit(code)


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
                click.echo(f"error: {os_error_line(exc)}", err=True)
                sys.exit(2)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
                if debug:
                    raise
                detail = " ".join(str(exc).split())[:300]
                what = {RecursionError: "input nested too deeply", MemoryError: "out of memory"}.get(type(exc), "")
                click.echo(f"error: {what + ': ' if what else ''}{type(exc).__name__}: {detail} "
                           f"(unexpected; rerun with --debug for the traceback and report it)", err=True)
                sys.exit(2)

        return wrapper

    return decorate(fn) if fn is not None else decorate
