"""CLI inputs: Meta's hydra YAML for --sam2-config, torch's dtype names for --dtype."""

from __future__ import annotations

import shutil

import yaml
from click.testing import CliRunner

from maskport.cli import main
from maskport.testing.sam2 import tiny_meta_sam2_config


def test_sam2_config_yaml_and_torch_dtype_names(fx, tmp_path):
    """The tiny SAM2's config written as Meta writes theirs (hydra header, YAML) is accepted by --sam2-config; with
    no config the tiny SAM2 matches no preset and the message names the flag; --dtype takes float32/bfloat16."""
    cfg = tmp_path / "sam2_hiera_tiny_custom.yaml"
    cfg.write_text("# @package _global_\n\n" + yaml.safe_dump(tiny_meta_sam2_config(), sort_keys=False))
    bare = tmp_path / "tiny_sam2.pt"  # no .config.json sidecar beside this copy
    shutil.copy(fx.sam2_pt, bare)
    common = ["convert", "mmengine-to-hf", str(fx.ckpt), "--base", str(fx.base_dir), "--sam2", str(bare), "--dry-run"]
    r = CliRunner().invoke(main, common)
    assert r.exit_code == 2 and "matches none of the official presets" in r.output and "--sam2-config" in r.output
    assert len(r.output.strip().splitlines()) == 1
    for dtype, shown in (("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("fp32", "float32")):
        r = CliRunner().invoke(main, [*common, "--sam2-config", str(cfg), "--dtype", dtype])
        assert r.exit_code == 0, r.output
        assert f"in {shown}" in r.output
    r = CliRunner().invoke(main, [*common, "--sam2-config", str(cfg), "--dtype", "double"])
    assert r.exit_code == 2
