"""The family registry: every registered family is complete (mapping, export code, quantize target or a reason,
docs page, golden mapping, an end-to-end test), its names come from its spec only, and the CLI offers exactly the
inputs it declares."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

from maskport.families import FAMILIES, MMENGINE_TO_HF, command_inputs, get_family, released_commands
from maskport.heads import remote_file

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "maskport"
GOLDEN = json.loads((Path(__file__).resolve().parent / "golden" / "export_hashes.json").read_text())

NAMES = sorted(FAMILIES)


def test_families_are_found():
    assert {"sa2va-qwen2_5-vl", "sa2va-internvl"} <= set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_family_folder_is_complete(name):
    fam = get_family(name)
    spec = fam.spec
    folder = fam.folder
    assert folder == SRC / "families" / spec.package and folder.is_dir()
    assert (folder / "mapping.py").is_file(), "a family's mapping table lives in its mapping.py"
    # exported code: both files, the classes auto_map names, and model_type equal to the spec's
    for f in spec.code_files:
        assert (folder / "remote" / f).is_file(), f
    cfg_mod = importlib.import_module(f"maskport.families.{spec.package}.remote.{spec.code_files[0][:-3]}")
    mdl_mod = importlib.import_module(f"maskport.families.{spec.package}.remote.{spec.code_files[1][:-3]}")
    cfg_cls = getattr(cfg_mod, spec.config_class)
    assert cfg_cls.model_type == spec.model_type
    assert getattr(mdl_mod, spec.model_class).config_class is cfg_cls
    assert spec.auto_map == {"AutoConfig": f"{spec.code_files[0][:-3]}.{spec.config_class}",
                             "AutoModel": f"{spec.code_files[1][:-3]}.{spec.model_class}"}
    for head in spec.heads:
        assert remote_file(head).is_file()
    # quantize target, or a stated reason
    if spec.quant_target is None:
        assert spec.no_quant_reason
    else:
        from maskport.quantize.targets import QuantTarget, target_for

        target = target_for(spec.model_type)
        assert isinstance(target, QuantTarget) and target.spec is spec
    # docs page and golden mapping
    assert spec.docs and (ROOT / spec.docs).is_file(), spec.docs
    assert (ROOT / "docs" / "families" / f"{spec.name}.mapping.tsv").is_file()
    assert name in (ROOT / "README.md").read_text(), "the README's 'Supported families' table names every family"
    # an end-to-end test: a converted fixture whose tensors are recorded (tests/golden.py)
    assert any(k.startswith(name + "/") for k in GOLDEN), f"no recorded end-to-end export of {name}"


def _literals_and_names(path: Path) -> set[str]:
    """String constants (not docstrings) and identifiers of a Python file."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            out.add(n.value)
        elif isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, (ast.ImportFrom,)) and n.module:
            out.add(n.module)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_no_code_outside_the_family_folder_names_it(name):
    """The engine, the commands, quantize and verify never spell a family: adding one touches only its folder (and
    its fixtures in maskport.testing)."""
    spec = get_family(name).spec
    words = {spec.name, spec.package, spec.model_type, spec.config_class, spec.model_class}
    own = SRC / "families" / spec.package
    for path in SRC.rglob("*.py"):
        if own in path.parents or (SRC / "testing") in path.parents:
            continue
        found = {w for w in words for s in _literals_and_names(path) if w in s}
        assert not found, f"{path.relative_to(ROOT)} names family {name}: {found}"


def test_cli_offers_exactly_the_declared_inputs():
    from maskport.cli import convert

    for command in [MMENGINE_TO_HF, *released_commands()]:
        params = {p.name for p in convert.commands[command].params}
        for opt in command_inputs(command):
            assert opt.name in params, (command, opt.name)
    # a family is refused an input it does not declare, before anything is opened
    from maskport.convert.api import convert_mmengine_to_hf
    from maskport.errors import MissingInput

    with pytest.raises(MissingInput, match="--pretrained-pth: not an input of family sa2va-qwen2_5-vl"):
        convert_mmengine_to_hf("does-not-exist.pth", out=None, dry_run=True, family="sa2va-qwen2_5-vl",
                               pretrained_pth="x.pth")
