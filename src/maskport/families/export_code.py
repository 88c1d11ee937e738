"""Is an export folder's Python code the code this maskport writes? Checked before ``verify``, ``quantize`` and
``serve`` load a folder with ``trust_remote_code=True`` (which imports the folder's ``.py`` files).

An export holds its family's ``configuration_*.py`` / ``modeling_*.py`` and the shared heads they import, copied
byte for byte from ``families/<package>/remote/`` and ``heads/remote/`` (:func:`~maskport.families._common.
copy_export_code`). A folder whose ``config.json`` names no maskport family, or that holds any ``.py`` file (at any
depth) that is not byte-identical to the file of that name this maskport version writes for its family, would run
code maskport did not write: it is refused, naming the file, unless the user passes ``--trust-export-code`` (for an
export written by another maskport version, or code they have read). Only the folder's own bytes are read; nothing
is imported.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MaskportError

TRUST_FLAG = "--trust-export-code"


class UntrustedCode(MaskportError):
    """The folder holds Python code that is not this maskport's export code."""


def expected_code(model_type) -> dict[str, Path] | None:
    """File name -> this maskport's file, for the exports of the family with this ``model_type`` (``None``: no
    family has it)."""
    from . import FAMILIES_DIR, family_for_model_type
    from ..heads import remote_file

    fam = family_for_model_type(model_type)
    if fam is None:
        return None
    files = {name: FAMILIES_DIR / fam.spec.package / "remote" / name for name in fam.spec.code_files}
    files.update({f"{head}.py": remote_file(head) for head in fam.spec.heads})
    return files


def check_export_code(folder: str | Path, role: str = "export") -> None:
    """Raise :class:`UntrustedCode` (one line, naming the file and the flag) unless every ``.py`` file under
    ``folder`` is byte-identical to the export code this maskport writes for the family its ``config.json`` names."""
    from ..io.jsonfile import read_json_file

    folder = Path(folder)
    cfg = read_json_file(folder / "config.json", what=f"the {role}'s config")
    expected = expected_code(cfg.get("model_type"))
    py_files = sorted(p for p in folder.rglob("*.py") if not any(part.startswith(".") for part in
                                                                    p.relative_to(folder).parts[:-1]))
    if expected is None:
        if not py_files and not cfg.get("auto_map"):
            return  # a plain transformers folder: no code of its own runs
        raise UntrustedCode(f"{role} {folder}: model_type {str(cfg.get('model_type'))[:80]!r} is not a maskport "
                            f"export, and loading it runs its own Python code; pass {TRUST_FLAG} to run it anyway")
    for p in py_files:
        rel = p.relative_to(folder).as_posix()
        mine = expected.get(rel)
        if p.is_symlink() or mine is None:
            raise UntrustedCode(f"{role} {folder}: {rel} is not a file maskport writes for this family (it would "
                                f"run when the folder is loaded); pass {TRUST_FLAG} to run it anyway")
        if p.stat().st_size != mine.stat().st_size or p.read_bytes() != mine.read_bytes():
            raise UntrustedCode(f"{role} {folder}: {rel} differs from the code this maskport version writes (edited, "
                                f"or written by another version); pass {TRUST_FLAG} to run it anyway, or "
                                "convert again")


__all__ = ["TRUST_FLAG", "UntrustedCode", "check_export_code", "expected_code"]
