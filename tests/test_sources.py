"""Readers: safe unpickling with the allowlist, mmengine/DeepSpeed layouts, HF folders, clear errors."""

import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from maskport.convert.safe_load import safe_torch_load
from maskport.convert.sources import open_hf_folder, open_training_checkpoint
from maskport.heads.sam2 import open_sam2_checkpoint
from maskport.errors import MissingInput, UnreadableFile, UnsafeCheckpoint, UnsupportedCheckpoint


def _mmengine_like(path):
    """An mmengine-style checkpoint with real mmengine objects in message_hub."""
    mmengine = pytest.importorskip("mmengine")
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance(f"maskport-test-{os.getpid()}-{path.name}")
    for i in range(3):
        hub.update_scalar("train/loss", float(i) * 0.5)
    hub.update_info("iter", 3)
    hub.update_info("np_scalar", np.float64(1.25))
    sd = OrderedDict(w=torch.randn(4, 4).bfloat16(), b=torch.zeros(4))
    ckpt = {"meta": {"cfg": "x = dict(r=4, lora_alpha=8)\n", "iter": 3, "seed": 0, "mmengine": mmengine.__version__},
            "state_dict": sd, "message_hub": hub.state_dict(), "param_schedulers": [{"base_lrs": [1e-4]}]}
    torch.save(ckpt, path)
    return sd


def test_mmengine_checkpoint_needs_the_allowlist(tmp_path):
    p = tmp_path / "iter_3.pth"
    sd = _mmengine_like(p)
    with pytest.raises(Exception):
        torch.load(p, weights_only=True)  # plain weights_only refuses mmengine/numpy objects
    obj = safe_torch_load(p)
    assert torch.equal(obj["state_dict"]["w"], sd["w"])
    ck = open_training_checkpoint(p)
    assert ck.format == "mmengine" and sorted(ck.source.keys()) == ["b", "w"]
    assert ck.source.info("w").dtype == torch.bfloat16 and ck.config_text.startswith("x = dict")


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"x": Evil()}}, p)
    with pytest.raises(UnsafeCheckpoint, match="allow-unsafe-pickle"):
        open_training_checkpoint(p)
    assert not marker.exists()


def test_unsafe_opt_in_is_loud(tmp_path, capsys):
    p = tmp_path / "odd.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"when": __import__("datetime").date(2026, 1, 1)}}, p)
    with pytest.raises(UnsafeCheckpoint):
        open_training_checkpoint(p)
    ck = open_training_checkpoint(p, allow_unsafe_pickle=True)
    assert "w" in ck.source
    assert "FULL pickle" in capsys.readouterr().err


def test_garbage_and_missing_files(tmp_path):
    with pytest.raises(MissingInput):
        open_training_checkpoint(tmp_path / "nope.pth")
    g = tmp_path / "garbage.pth"
    g.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(UnreadableFile):
        open_training_checkpoint(g)
    t = tmp_path / "list.pth"
    torch.save([1, 2, 3], t)
    with pytest.raises(UnreadableFile, match="not a checkpoint dict"):
        open_training_checkpoint(t)


def test_legacy_non_zip_format_loads_without_mmap(tmp_path):
    p = tmp_path / "legacy.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, p, _use_new_zipfile_serialization=False)
    assert torch.equal(open_training_checkpoint(p).source.load("w"), torch.ones(2))


def test_deepspeed_zero3_is_refused_with_advice(tmp_path):
    d = tmp_path / "iter_10.pth"
    (d / "global_step10").mkdir(parents=True)
    (d / "latest").write_text("global_step10")
    for r in range(2):
        torch.save({"module": None}, d / "global_step10" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    with pytest.raises(UnsupportedCheckpoint, match="ZeRO-3.*zero_to_fp32"):
        open_training_checkpoint(d)


def test_deepspeed_zero2_layout_and_stage_check(tmp_path):
    d = tmp_path / "iter_5.pth"
    d.mkdir()
    torch.save({"module": OrderedDict({"module.a": torch.ones(3)}), "ds_config": {"zero_optimization": {"stage": 2}},
                "param_shapes": [OrderedDict(a=torch.Size([3]))]}, d / "mp_rank_00_model_states.pt")
    ck = open_training_checkpoint(d)
    assert ck.format == "deepspeed" and ck.source.keys() == ["a"]  # 'module.' prefix stripped
    torch.save({"module": {"a": torch.ones(1)}, "ds_config": {"zero_optimization": {"stage": 3}}},
               d / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsupportedCheckpoint):
        open_training_checkpoint(d)


def test_folder_that_is_not_deepspeed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UnreadableFile, match="not a DeepSpeed checkpoint"):
        open_training_checkpoint(tmp_path)


def test_hf_folder_bin_and_missing(tmp_path):
    torch.save({"x": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert open_hf_folder(tmp_path).info("x").shape == (2,)
    with pytest.raises(MissingInput):
        open_hf_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnreadableFile, match="no model.safetensors"):
        open_hf_folder(tmp_path / "empty")


def test_sam2_checkpoint_layouts(tmp_path):
    p = tmp_path / "sam2.pt"
    torch.save({"model": {"image_encoder.x": torch.ones(1)}}, p)
    assert open_sam2_checkpoint(p).keys() == ["image_encoder.x"]
    torch.save({"foo": "bar"}, p)
    with pytest.raises(UnreadableFile, match="not a SAM2 checkpoint"):
        open_sam2_checkpoint(p)
    with pytest.raises(MissingInput):
        open_sam2_checkpoint(tmp_path / "none.pt")
