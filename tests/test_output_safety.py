"""io/atomic.py: outputs apart from inputs, one writer per output, what killed runs left is settled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from maskport.errors import MissingInput
from maskport.io.atomic import atomic_output_dir, check_output_apart, clean_stale, lock_path, output_lock


def test_output_apart_from_inputs(tmp_path):
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    ck = tmp_path / "run" / "iter.pth"
    ck.parent.mkdir()
    ck.write_bytes(b"x")
    os.symlink(base, tmp_path / "link")
    for out, why in [(base, "is the input"), (base / "sub" / "o", "is inside"), (tmp_path / "run", "contains"),
                     (ck, "is the input"), (tmp_path / "x" / ".." / "base", "is the input"),
                     (tmp_path / "link", "symbolic link")]:
        with pytest.raises(MissingInput, match=why):
            check_output_apart(out, [base, ck])
    check_output_apart(tmp_path / "elsewhere", [base, ck])  # apart: no error


def test_second_writer_is_refused_and_the_lock_file_goes(tmp_path):
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys, time
        from maskport.io.atomic import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(MissingInput, match=f"pid {p.pid}"):
            with atomic_output_dir(out):
                pass
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        p.wait(timeout=30)
    assert not lock_path(out).exists()
    with atomic_output_dir(out) as tmp:  # free again
        (tmp / "f").write_text("x")
    assert (out / "f").is_file() and sorted(os.listdir(tmp_path)) == ["out"]


def test_lock_is_reentrant_in_one_process(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with atomic_output_dir(out) as tmp:
            (tmp / "f").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_killed_runs_leftovers_are_settled(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.maskport-partial-999999").mkdir()
    (tmp_path / ".out.maskport-quant-abc").mkdir()
    old = tmp_path / ".out.maskport-old-999998"
    old.mkdir()
    (old / "weights").write_text("the previous export")
    with output_lock(out):
        done = clean_stale(out)
    assert len(done) == 3 and any("restored" in d for d in done)
    assert (out / "weights").read_text() == "the previous export"  # put back: the new one never arrived
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_full_disk_is_one_line_naming_the_output_and_nothing_is_left(tmp_path):
    import errno

    from maskport.cli_errors import os_error_line

    out = tmp_path / "out"
    with pytest.raises(OSError) as ei:
        with atomic_output_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")  # what os.write raises on a full disk
    line = os_error_line(ei.value)
    assert "no space left" in line and str(out) in line and "\n" not in line
    assert os.listdir(tmp_path) == []
