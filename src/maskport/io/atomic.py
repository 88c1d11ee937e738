"""Write an output folder so that it appears whole or not at all.

:func:`atomic_output_dir` hands out a hidden temporary folder beside the output, ``.NAME.maskport-partial-PID``
(same parent, so the final rename stays on one file system), and renames it to ``NAME`` only when the block
finished without an exception. A run that fails removes its temporary folder; a run that is killed (SIGKILL,
power loss) leaves only that hidden folder behind, never something at ``NAME`` that looks like an export.

Writers of one output are serialised by a lock file (``.NAME.maskport-lock``, an ``flock`` the kernel releases
when its holder dies); the next run cleans what a killed one left. An output that is, contains or lies inside an
input is refused whatever the flags.

With ``overwrite`` an existing ``NAME`` is first renamed aside to ``.NAME.maskport-old-PID``, the new folder is
renamed into place and the old one deleted; if the second rename fails, the old folder is put back.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MissingInput


def partial_dir(out: Path) -> Path:
    """The temporary folder this process writes ``out`` into: ``.NAME.maskport-partial-PID`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.maskport-partial-{os.getpid()}"


def old_dir(out: Path) -> Path:
    """Where an existing ``out`` is moved while it is replaced: ``.NAME.maskport-old-PID`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.maskport-old-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _resolved(p: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(p)))


def check_output_apart(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs`` (after resolving symlinks and
    ``..``), whatever ``--overwrite`` says, and an output that is itself a symlink (replacing it would act on the
    folder it points to). :class:`~maskport.errors.MissingInput` naming both."""
    out = Path(out)
    if out.is_symlink():
        raise MissingInput(f"output {out} is a symbolic link (to {os.readlink(out)}); give the real folder's path "
                           f"(maskport does not write through links)")
    ro = _resolved(out)
    for inp in inputs:
        if inp is None:
            continue
        ri = _resolved(Path(inp))
        if ro == ri:
            why = "is"
        elif ro.is_relative_to(ri):
            why = "is inside"
        elif ri.is_relative_to(ro):
            why = "contains"
        else:
            continue
        raise MissingInput(f"output {out} {why} the input {inp}; choose another -o (an input is never "
                           f"overwritten, even with --overwrite)")


LOCK_SUFFIX = ".maskport-lock"


def lock_path(out: Path) -> Path:
    """The lock file serialising writers of ``out``: ``.NAME.maskport-lock`` beside it (removed at the end)."""
    out = Path(out)
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


_HELD: set[str] = set()


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.NAME.maskport-lock`` while ``out`` is written: a second writer of the same
    output is refused at once (:class:`~maskport.errors.MissingInput` naming the holder's PID). The kernel drops the
    lock when its holder dies, so a killed run never blocks the next one. The file is removed on the way out."""
    import fcntl

    path = lock_path(out)
    key = str(_resolved(path))
    if key in _HELD:  # this process holds it already (quantize holds it for the whole run)
        yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise MissingInput(f"another maskport process (pid {holder}) is writing {out}; wait for it to finish "
                               f"(lock file {path})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not unlinked by a holder that just finished
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD.add(key)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD.discard(key)
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def clean_stale(out: Path) -> list[str]:
    """With the output's lock held (so no live writer of ``out`` exists): remove the temporary folders earlier runs
    left beside ``out`` when they were killed (``.NAME.maskport-partial-PID``), and settle ``.NAME.maskport-old-PID``
    (the previous output, moved aside by a run killed while replacing it): put back if ``out`` is missing, removed
    otherwise. Returns what was done, one line each."""
    out = Path(out)
    done = []
    if not out.parent.is_dir():
        return done
    stale = [*out.parent.glob(f".{glob.escape(out.name)}.maskport-partial-*"),
             *out.parent.glob(f".{glob.escape(out.name)}.maskport-quant-*")]
    for p in sorted(stale):
        _remove(p)
        done.append(f"removed {p.name}, left by a run that was killed")
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.maskport-old-*")):
        if not (out.exists() or out.is_symlink()):
            p.rename(out)
            done.append(f"restored {out.name} from {p.name}, left by a run killed while replacing it")
        else:
            _remove(p)
            done.append(f"removed {p.name}, the output a killed run had replaced")
    return done


def _with_filename(exc: OSError, out: Path) -> OSError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not exc.filename:
        return OSError(exc.errno, exc.strerror, str(out))
    return exc


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                      log=None) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside ``out``; rename it to ``out`` when the block succeeds.

    - refuses an output that is, contains or is inside one of ``inputs`` (:func:`check_output_apart`), or a link;
    - creates ``out``'s parent if needed and takes the output's lock (:func:`output_lock`: a concurrent writer of
      the same output is refused), then cleans what killed runs left beside it (:func:`clean_stale`; ``log``
      gets one line per item);
    - ``out`` existing is refused (:class:`~maskport.errors.MissingInput`) unless ``overwrite``, both on entry and
      when renaming at the end (it may have appeared meanwhile);
    - on any exception in the block (Ctrl-C included) the temporary folder is removed, ``out`` is left as it
      was, and the exception propagates (a full disk as an ``OSError`` naming ``out``).
    """
    out = Path(out)
    check_output_apart(out, inputs)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MissingInput(f"output folder {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    reentered = str(_resolved(lock_path(out))) in _HELD
    with output_lock(out):
        for line in ([] if reentered else clean_stale(out)):
            if log is not None:
                log(line)
        tmp = partial_dir(out)
        tmp.mkdir()
        try:
            try:
                yield tmp
            except OSError as exc:
                raise _with_filename(exc, out) from exc
            if out.exists() or out.is_symlink():
                if not overwrite:
                    raise MissingInput(f"output folder {out} appeared while writing; nothing was replaced "
                                       f"(pass --overwrite to replace it)")
                if out.is_symlink():
                    raise MissingInput(f"output {out} became a symbolic link while writing; nothing was replaced")
                trash = old_dir(out)
                if trash.exists() or trash.is_symlink():
                    _remove(trash)
                out.rename(trash)
                try:
                    tmp.rename(out)
                except BaseException:
                    trash.rename(out)  # put the old output back
                    raise
                _remove(trash)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def atomic_output_file(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``out`` (``.NAME.maskport-partial-PID``); when the block succeeds, the
    file is renamed onto ``out`` in one step (``os.replace``), so ``out`` is whole or absent (or the old file).

    ``out`` existing is refused (:class:`~maskport.errors.MissingInput`) unless ``overwrite``, on entry and at the
    end; an existing folder at ``out`` is always refused. The output's lock is held while writing (a second writer
    is refused) and what killed runs left beside ``out`` is cleaned first (:func:`clean_stale`). On any exception
    the temporary file is removed."""
    out = Path(out)
    if out.is_dir():
        raise MissingInput(f"output {out} is a folder; give a file name (e.g. {out / 'model.pth'})")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MissingInput(f"output file {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        clean_stale(out)
        tmp = partial_dir(out)
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        try:
            try:
                yield tmp
            except OSError as exc:
                raise _with_filename(exc, out) from exc
            if (out.exists() or out.is_symlink()) and not overwrite:
                raise MissingInput(f"output file {out} appeared while writing; nothing was replaced "
                                   "(pass --overwrite to replace it)")
            os.replace(tmp, out)
        except BaseException:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)
            raise


__all__ = ["atomic_output_dir", "atomic_output_file", "check_output_apart", "clean_stale", "lock_path", "old_dir",
           "output_lock", "partial_dir"]
