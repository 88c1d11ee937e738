"""verify, quantize and serve load export folders with trust_remote_code=True, which imports the folder's .py files:
they refuse a folder whose Python code is not the export code this maskport writes (edited, added, foreign), before
anything is imported, unless --trust-export-code is given."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner

from maskport.cli import main
from maskport.families.export_code import UntrustedCode, check_export_code, expected_code


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def export_copy(demo_export, tmp_path):
    """The demo export's small files (config, code, tokenizer); the weights are not needed to check code."""
    out = tmp_path / "export"
    shutil.copytree(demo_export, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


def _one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def test_a_fresh_export_holds_exactly_the_code_maskport_writes(demo_export):
    check_export_code(demo_export)
    cfg = json.loads((demo_export / "config.json").read_text())
    expected = expected_code(cfg["model_type"])
    assert sorted(p.name for p in demo_export.glob("*.py")) == sorted(expected)
    assert expected_code("llava") is None


def test_edited_added_or_linked_code_is_refused(export_copy, tmp_path):
    modeling = sorted(export_copy.glob("modeling_*.py"))[0]
    check_export_code(export_copy)
    modeling.write_text(modeling.read_text() + "\nimport os  # a stranger's line\n")
    with pytest.raises(UntrustedCode, match=f"{modeling.name} differs"):
        check_export_code(export_copy)
    shutil.copy2(expected_code(json.loads((export_copy / "config.json").read_text())["model_type"])[modeling.name],
                 modeling)
    check_export_code(export_copy)
    (export_copy / "sub").mkdir()
    (export_copy / "sub" / "evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(UntrustedCode, match="sub/evil.py is not a file maskport writes"):
        check_export_code(export_copy)
    shutil.rmtree(export_copy / "sub")
    real = tmp_path / "elsewhere.py"
    shutil.copy2(modeling, real)
    modeling.unlink()
    modeling.symlink_to(real)
    with pytest.raises(UntrustedCode, match="is not a file maskport writes"):
        check_export_code(export_copy)


def test_foreign_folders(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llava"}))
    check_export_code(plain)  # nothing of its own would run
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "sa2va_chat",
                                                   "auto_map": {"AutoModel": "modeling_sa2va.Sa2VA"}}))
    (remote / "modeling_sa2va.py").write_text("x = 1\n")
    with pytest.raises(UntrustedCode, match="'sa2va_chat' is not a maskport export"):
        check_export_code(remote)


@pytest.mark.parametrize("command", ["verify", "quantize", "serve"])
def test_commands_refuse_in_one_line_and_the_flag_lets_it_through(export_copy, tmp_path, command):
    modeling = sorted(export_copy.glob("modeling_*.py"))[0]
    modeling.write_text(modeling.read_text() + "\n# edited\n")
    before = _hashes(export_copy)
    args = {"verify": ["verify", str(export_copy), str(export_copy), "--samples", str(tmp_path / "none")],
            "quantize": ["quantize", str(export_copy), "-o", str(tmp_path / "q")],
            "serve": ["serve", str(export_copy), "--port", "0"]}[command]
    r = CliRunner().invoke(main, args)
    _one_line_error(r, modeling.name, "--trust-export-code")
    assert _hashes(export_copy) == before and not (tmp_path / "q").exists()
    # with the flag, the code check is skipped: the command goes on and fails later, for another reason
    r = CliRunner().invoke(main, [*args, "--trust-export-code"])
    assert r.exit_code == 2 and "--trust-export-code" not in r.output, r.output
