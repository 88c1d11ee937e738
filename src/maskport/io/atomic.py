"""Write an output folder so that it appears whole or not at all.

:func:`atomic_output_dir` hands out a hidden temporary folder beside the output, ``.NAME.maskport-partial-PID``
(same parent, so the final rename stays on one file system), and renames it to ``NAME`` only when the block
finished without an exception. A run that fails removes its temporary folder; a run that is killed (SIGKILL,
power loss) leaves only that hidden folder behind, never something at ``NAME`` that looks like an export.

With ``overwrite`` an existing ``NAME`` is first renamed aside to ``.NAME.maskport-old-PID``, the new folder is
renamed into place and the old one deleted; if the second rename fails, the old folder is put back.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
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


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside ``out``; rename it to ``out`` when the block succeeds.

    - creates ``out``'s parent if needed, and removes a stale temporary folder of the same name (same PID);
    - ``out`` existing is refused (:class:`~maskport.errors.MissingInput`) unless ``overwrite``, both on entry and
      when renaming at the end (it may have appeared meanwhile);
    - on any exception in the block (Ctrl-C included) the temporary folder is removed, ``out`` is left as it
      was, and the exception propagates.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MissingInput(f"output folder {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    if tmp.exists() or tmp.is_symlink():
        _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise MissingInput(f"output folder {out} appeared while writing; nothing was replaced "
                                   f"(pass --overwrite to replace it)")
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
    end; an existing folder at ``out`` is always refused. On any exception the temporary file is removed."""
    out = Path(out)
    if out.is_dir():
        raise MissingInput(f"output {out} is a folder; give a file name (e.g. {out / 'model.pth'})")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MissingInput(f"output file {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    if tmp.exists() or tmp.is_symlink():
        _remove(tmp)
    try:
        yield tmp
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise MissingInput(f"output file {out} appeared while writing; nothing was replaced "
                               "(pass --overwrite to replace it)")
        os.replace(tmp, out)
    except BaseException:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        raise


__all__ = ["atomic_output_dir", "atomic_output_file", "old_dir", "partial_dir"]
