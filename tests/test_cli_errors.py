"""Every error a user will hit: one line on stderr, exit code 2, no traceback; nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from maskport.cli import main


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def convert_args(fx, out, **over):
    args = {"--base": fx.base_dir, "--sam2": fx.sam2_pt, "-o": out, **over}
    flat = ["convert", "mmengine-to-hf", over.pop("ckpt", fx.ckpt) if "ckpt" in over else fx.ckpt]
    for k, v in args.items():
        if k == "ckpt" or v is None:
            continue
        flat += [k, v]
    return flat + ["--no-progress"]


def assert_one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    err = r.stderr if hasattr(r, "stderr") else r.output
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_missing_base_folder(fx, tmp_path):
    r = run(*convert_args(fx, tmp_path / "out", **{"--base": tmp_path / "nope"}))
    assert_one_line_error(r, "base model folder", "does not exist")
    assert not (tmp_path / "out").exists()


def test_base_not_given(fx, tmp_path):
    r = run(*convert_args(fx, tmp_path / "out", **{"--base": None}))
    assert_one_line_error(r, "--base is required")


def test_base_of_the_wrong_family(fx, tmp_path):
    wrong = tmp_path / "llava"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "llava"}))
    r = run(*convert_args(fx, tmp_path / "out", **{"--base": wrong}))
    assert_one_line_error(r, "'llava'", "Qwen2.5-VL base")


def test_base_of_another_size_names_tensor_and_both_sizes(fx, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fx.base_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    r = run(*convert_args(fx, tmp_path / "out", **{"--base": other}))
    assert_one_line_error(r, "text_hidden_fcs.0.weight", "64", "96")


def test_checkpoint_of_another_family(fx, tmp_path):
    p = tmp_path / "lisa.pth"
    torch.save({"state_dict": {"model.visual_model.mask_decoder.x": torch.zeros(2)}, "meta": {}}, p)
    r = run(*convert_args(fx, tmp_path / "out", ckpt=p))
    assert_one_line_error(r, "no known family recognises this checkpoint")


def test_forced_family_that_does_not_fit(fx, tmp_path):
    p = tmp_path / "lisa.pth"
    torch.save({"state_dict": {"model.visual_model.mask_decoder.x": torch.zeros(2)}}, p)
    r = run(*convert_args(fx, tmp_path / "out", ckpt=p, **{"--family": "sa2va-qwen2_5-vl"}))
    assert_one_line_error(r, "do not look like family sa2va-qwen2_5-vl")


def test_shape_mismatch_inside_the_plan_names_tensor_and_shapes(fx, tmp_path):
    sd = torch.load(fx.ckpt, weights_only=False)["state_dict"]
    key = "mllm.model.base_model.model.lm_head.modules_to_save.default.weight"
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1, dtype=sd[key].dtype)
    p = tmp_path / "bad.pth"
    torch.save({"state_dict": sd, "meta": {"cfg": "r = dict(r=8, lora_alpha=16)\n"}}, p)
    r = run(*convert_args(fx, tmp_path / "out", ckpt=p))
    assert_one_line_error(r, "shape mismatch for mllm.lm_head.weight", "(460, 65)", "(460, 64)")
    assert not (tmp_path / "out").exists()


def test_missing_sam2(fx, tmp_path):
    r = run(*convert_args(fx, tmp_path / "out", **{"--sam2": tmp_path / "sam2_hiera_large.pt"}))
    assert_one_line_error(r, "SAM2 checkpoint", "does not exist")
    r = run(*convert_args(fx, tmp_path / "out", **{"--sam2": None}))
    assert_one_line_error(r, "--sam2 is required")


def test_unreadable_checkpoint(fx, tmp_path):
    p = tmp_path / "iter_1.pth"
    p.write_bytes(b"definitely not a checkpoint")
    r = run(*convert_args(fx, tmp_path / "out", ckpt=p))
    assert_one_line_error(r, "not a readable torch checkpoint")


def test_unknown_lora_alpha_asks_for_the_flag(fx, tmp_path):
    sd = torch.load(fx.ckpt, weights_only=False)["state_dict"]
    p = tmp_path / "nocfg.pth"
    torch.save({"state_dict": sd}, p)
    r = run(*convert_args(fx, tmp_path / "out", ckpt=p))
    assert_one_line_error(r, "--lora-alpha")
    r = run(*convert_args(fx, tmp_path / "out", ckpt=p, **{"--lora-alpha": fx.lora_alpha}))
    assert r.exit_code == 0, r.output


def test_lora_rank_flag_is_checked(fx, tmp_path):
    r = run(*convert_args(fx, tmp_path / "out", **{"--lora-r": fx.lora_r * 2}))
    assert_one_line_error(r, "rank")


def test_debug_shows_the_traceback(fx, tmp_path):
    r = CliRunner().invoke(main, ["--debug", *map(str, convert_args(fx, tmp_path / "o", **{"--base": tmp_path / "x"}))])
    assert r.exit_code != 0 and r.exception is not None and type(r.exception).__name__ == "MissingInput"


def test_existing_output_needs_overwrite(fx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run(*convert_args(fx, out))
    assert_one_line_error(r, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    r = run(*convert_args(fx, out), "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_dry_run_writes_nothing_and_reports_coverage(fx, tmp_path):
    r = run(*convert_args(fx, tmp_path / "out"), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "unaccounted" in r.output and "dry run" in r.output
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    r = run(*convert_args(fx, tmp_path / "out"), "--dry-run", "--report-json")
    rep = json.loads(r.output)
    assert rep["coverage"]["unaccounted"] == [] and len(rep["targets"]) == rep["coverage"]["targets"]


def test_interrupted_run_leaves_no_folder_that_looks_complete(fx, tmp_path, monkeypatch):
    import maskport.convert.writer as writer

    calls = {"n": 0}
    real = writer.run_step

    def flaky(ps, plan):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return real(ps, plan)

    monkeypatch.setattr(writer, "run_step", flaky)
    from maskport.convert.api import convert_mmengine_to_hf

    with pytest.raises(KeyboardInterrupt):
        convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is removed too


def test_killed_run_leaves_only_a_hidden_partial_folder(fx, tmp_path):
    """SIGKILL cannot be cleaned up after; what remains must not look like an export."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, time, maskport.convert.writer as w\n"
        "real = w.run_step\n"
        "def slow(ps, plan):\n"
        "    time.sleep(0.05); return real(ps, plan)\n"
        "w.run_step = slow\n"
        "from maskport.cli import main\n"
        "sys.argv = ['maskport'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = list(map(str, convert_args(fx, tmp_path / "out")))
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".out.maskport-partial-*/model*.safetensors")):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "out").exists()
    leftovers = [x.name for x in tmp_path.iterdir()]
    assert all(n.startswith(".out.maskport-partial-") or n == ".out.maskport-lock" for n in leftovers), leftovers
    assert any(n.startswith(".out.maskport-partial-") for n in leftovers), leftovers
    # the next run to the same -o cleans what the killed one left (its lock died with it) and succeeds
    r = run(*convert_args(fx, tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
