"""A base that ties lm_head to embed_tokens (Qwen2.5-VL-3B: ``tie_word_embeddings: true``, no ``lm_head.weight`` in
its safetensors) converts: the trained ``modules_to_save`` lm_head becomes the export's own, untied lm_head."""

import json
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from maskport.convert.api import convert_mmengine_to_hf


def _tied_copy_of(base_dir, dest):
    shutil.copytree(base_dir, dest)
    sd = load_file(dest / "model.safetensors")
    assert "lm_head.weight" in sd
    del sd["lm_head.weight"]
    save_file(sd, dest / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dest / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    cfg["text_config"]["tie_word_embeddings"] = True
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def _tensors(out_dir):
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_tied_base_without_lm_head_converts(fx, export_bf16, tmp_path):
    base = _tied_copy_of(fx.base_dir, tmp_path / "tied-base")
    res = convert_mmengine_to_hf(fx.ckpt, base=base, sam2=fx.sam2_pt, out=tmp_path / "out", progress=False)
    rep = json.loads((res.out_dir / "conversion_report.json").read_text())
    assert any("ties lm_head" in n for n in rep["notes"])
    from tests.golden import check_export

    check_export("sa2va-qwen2_5-vl/tied-base", res.out_dir)
    # nothing of the base is claimed as superseded by the trained lm_head: the base has no lm_head
    assert not any("lm_head" in d["source"] and d["source"].startswith("base:") for d in rep["dropped"])
    assert rep["coverage"]["sources"]["base"]["unaccounted"] == 0
    head = [t for t in rep["targets"] if t["target"] == "mllm.lm_head.weight"]
    assert len(head) == 1 and head[0]["sources"] == ["ckpt:mllm.model.base_model.model.lm_head.modules_to_save.default.weight"]
    # same export as from the untied base: the trained copies replace the base's embeddings and head either way
    ours, ref = _tensors(res.out_dir), _tensors(export_bf16.out_dir)
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    ckpt_head = torch.load(fx.ckpt, weights_only=False)["state_dict"][
        "mllm.model.base_model.model.lm_head.modules_to_save.default.weight"]
    assert torch.equal(ours["mllm.lm_head.weight"], ckpt_head)
    cfg = json.loads((res.out_dir / "config.json").read_text())
    assert cfg["mllm_config"]["tie_word_embeddings"] is False
