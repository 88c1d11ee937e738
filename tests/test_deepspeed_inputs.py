"""DeepSpeed inputs, every one written by DeepSpeed itself on CPU: ZeRO-3 folders over 2 ranks (read directly,
bit-identical to DeepSpeed's own zero_to_fp32), module states that keep persistent buffers (checked equal to the
base / SAM2 copy and dropped, or refused when they differ), and zero_to_fp32's outputs (one file or shards,
.bin or .safetensors)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from maskport.convert.api import convert_mmengine_to_hf
from maskport.errors import UnsafeCheckpoint, ValueMismatch
from tests.golden import check_export

pytest.importorskip("deepspeed")

GAUSS = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def _zero_to_fp32(folder: Path, **kw) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, **kw)


def _assert_bit_identical(source, ref: dict) -> None:
    assert source.keys() == list(ref)
    for k, want in ref.items():
        got = source.load(k)
        info = source.info(k)
        assert got.dtype == want.dtype == info.dtype and tuple(got.shape) == tuple(want.shape) == info.shape, k
        assert torch.equal(got.view(-1).view(torch.uint8) if got.is_floating_point() else got,
                           want.reshape(-1).view(torch.uint8) if want.is_floating_point() else want), k


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-3
# ----------------------------------------------------------------------------------------------------------------
def test_zero3_two_ranks_bit_identical_to_zero_to_fp32(tmp_path):
    """A 2-rank ZeRO-3 save (bf16 engine) of a model with odd-sized parameters, frozen parameters (saved, so their
    per-rank fragments are gathered too), float and integer buffers: every tensor equals DeepSpeed's own
    consolidation bit for bit, and the flat groups are read at their file offsets (no full unpickle)."""
    from maskport.convert.deepspeed import ZeRO3Source
    from maskport.convert.sources import open_training_checkpoint
    from maskport.testing.deepspeed import save_with_deepspeed

    t0 = time.time()
    folder = save_with_deepspeed("maskport.testing.deepspeed:toy_module", {"seed": 3}, tmp_path / "run", "global_step0",
                                 stage=3, world_size=2, exclude_frozen_parameters=False)
    assert time.time() - t0 < 60
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    tc = open_training_checkpoint(tmp_path / "run")  # the parent: the only tag folder is found
    assert tc.format == "deepspeed-zero3" and isinstance(tc.source, ZeRO3Source)
    assert tc.source.world_size == 2 and tc.dtype_hint == torch.bfloat16 and tc.meta == {"cfg": "toy = True\n"}
    assert all(o is not None for offs in tc.source._group_offsets for o in offs)  # pread at file offsets
    ref = _zero_to_fp32(folder)
    assert {"frozen.weight", "frozen.bias", "gauss", "index"} <= set(ref) and "cache" not in ref
    _assert_bit_identical(tc.source, ref)
    ref_nf = _zero_to_fp32(folder, exclude_frozen_parameters=True)
    assert set(ref) - set(ref_nf) == {"frozen.weight", "frozen.bias"}
    # a rank's optimizer file missing (an interrupted save): a one-line error, not a partial gather
    import shutil

    from maskport.errors import UnreadableFile

    broken = tmp_path / "broken" / "global_step0"
    shutil.copytree(folder, broken)
    (broken / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UnreadableFile, match="2 model-states files but 1 optimizer-states") as exc:
        open_training_checkpoint(broken)
    assert "\n" not in str(exc.value)


def test_zero3_optimizer_files_need_only_deepspeed_stubs(tmp_path):
    """The optimizer-state files pickle DeepSpeed's ZeroStageEnum and LossScaler: the plain allowlist refuses them;
    the reader extends it with inert stubs for exactly those (DeepSpeed itself is never imported for reading)."""
    from maskport.convert.safe_load import deepspeed_allowlist, safe_torch_load
    from maskport.testing.deepspeed import save_with_deepspeed

    folder = save_with_deepspeed("maskport.testing.deepspeed:toy_module", {"seed": 1}, tmp_path / "run", "t", stage=3,
                                 world_size=1)
    optim = folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with pytest.raises(UnsafeCheckpoint, match="ZeroStageEnum"):
        safe_torch_load(optim)
    obj = safe_torch_load(optim, extra_globals=deepspeed_allowlist())
    assert obj["optimizer_state_dict"]["zero_stage"] == 3


def test_sa2va_zero3_two_ranks_converts_like_zero2(fx, tmp_path):
    """Sa2VA's training module under ZeRO-3 over 2 ranks (bf16, module state with its buffers): read directly, the
    export equals the ZeRO-2 / mmengine one; the source equals zero_to_fp32's consolidation bit for bit."""
    from maskport.testing.sa2va_qwen2_5_vl import write_deepspeed_checkpoint

    folder = write_deepspeed_checkpoint(fx, tmp_path / "z3", stage=3, world_size=2, unfiltered_state_dict=True)
    res = convert_mmengine_to_hf(folder.parent, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / "out",
                                 progress=False)
    assert res.report["inputs"]["checkpoint"]["format"] == "deepspeed-zero3"
    assert res.report["settings"]["dtype"] == "bfloat16"  # the engine's training dtype, not the fp32 masters'
    assert res.report["coverage"]["unaccounted"] == []
    drops = {d["source"]: d for d in res.report["dropped"]}
    assert drops[f"ckpt:grounding_encoder.sam2_model.{GAUSS}"]["checked_equal_to"] == f"sam2:{GAUSS}"
    check_export("sa2va-qwen2_5-vl/deepspeed-zero2", res.out_dir)
    from maskport.convert.sources import open_training_checkpoint

    _assert_bit_identical(open_training_checkpoint(folder).source, _zero_to_fp32(folder))
    # the fp32 masters written as bf16 are converted while read: such a step takes only its bf16 output buffer (at
    # 7B the 2 GiB fp32 embed_tokens/lm_head gathered whole beside it broke the memory bound: RESULTS.md)
    from maskport.convert.writer import _step_buffer_plan

    plan = res.plan
    cast = [ps for ps in plan.steps if _step_buffer_plan(ps, plan)[2] == "cast-read"]
    names = {t for ps in cast for t in ps.step.targets}
    assert any("embed_tokens" in t for t in names) and any("lm_head" in t for t in names), sorted(names)[:5]
    for ps in cast:
        assert {r.source for r in ps.step.inputs} == {"ckpt"} and ps.input_infos[0].dtype == torch.float32
        assert _step_buffer_plan(ps, plan)[0] == [ps.output_infos[0].nbytes]


# ----------------------------------------------------------------------------------------------------------------
# buffers in DeepSpeed's module state
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_ds_buffers(fx, tmp_path_factory):
    from maskport.testing.sa2va_qwen2_5_vl import write_deepspeed_checkpoint

    return write_deepspeed_checkpoint(fx, tmp_path_factory.mktemp("dsbuf") / "z2", stage=2,
                                      unfiltered_state_dict=True)


def test_zero2_module_state_with_buffers_converts(fx, qwen_ds_buffers, tmp_path):
    """DeepSpeed's module state keeps SAM2's gaussian matrix (bf16 there): checked equal to Meta's fp32 tensor rounded
    to bf16, dropped with that reason; the export equals the one without buffers."""
    from maskport.convert.sources import open_training_checkpoint

    keys = open_training_checkpoint(qwen_ds_buffers).source.keys()
    assert f"grounding_encoder.sam2_model.{GAUSS}" in keys
    res = convert_mmengine_to_hf(qwen_ds_buffers, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / "out",
                                 progress=False)
    drop = [d for d in res.report["dropped"] if d.get("checked_equal_to")]
    assert [d["source"] for d in drop] == [f"ckpt:grounding_encoder.sam2_model.{GAUSS}"]
    assert "values checked equal" in drop[0]["reason"]
    check_export("sa2va-qwen2_5-vl/deepspeed-zero2", res.out_dir)


def test_a_buffer_that_differs_stops_the_conversion(fx, qwen_ds_buffers, tmp_path):
    """Another SAM2 than the one the run used (its gaussian matrix differs): a one-line ValueMismatch naming the
    buffer, raised while planning (also in a dry run), and no output folder."""
    sd = torch.load(fx.sam2_pt, map_location="cpu", weights_only=True)["model"]
    sd[GAUSS] = sd[GAUSS] + 0.5
    other = tmp_path / "other_sam2.pt"
    torch.save({"model": sd}, other)
    (tmp_path / "other_sam2.config.json").write_text(fx.sam2_pt.with_suffix(".config.json").read_text())
    for dry in (True, False):
        with pytest.raises(ValueMismatch) as exc:
            convert_mmengine_to_hf(qwen_ds_buffers, base=fx.base_dir, sam2=other, out=tmp_path / "out",
                                   progress=False, dry_run=dry)
        msg = str(exc.value)
        assert GAUSS in msg and "\n" not in msg and "max abs difference" in msg
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_internvl_zero2_module_state_with_buffers(tmp_path):
    """The InternVL family: a folder DeepSpeed wrote (fp32 engine, ZeRO-2) whose module state keeps SAM2's buffer
    converts to the recorded export of the same run's mmengine checkpoint."""
    from maskport.testing.sa2va_internvl import make_internvl_fixture

    fx = make_internvl_fixture(tmp_path / "fx", llm="qwen2", version="v2", deepspeed=True, deepspeed_buffers=True)
    assert sorted(p.name for p in fx.ckpt.iterdir()) == ["mp_rank_00_model_states.pt",
                                                         "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    res = convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / "out", progress=False,
                                 dtype="fp32")
    assert [d["source"] for d in res.report["dropped"] if d.get("checked_equal_to")] == [
        f"ckpt:grounding_encoder.sam2_model.{GAUSS}"]
    check_export("sa2va-internvl/qwen2-v2", res.out_dir)


# ----------------------------------------------------------------------------------------------------------------
# zero_to_fp32 outputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("safe,shard", [(False, None), (False, "300KB"), (True, None), (True, "300KB")])
def test_zero_to_fp32_outputs_convert_like_their_checkpoint(fx, qwen_ds_buffers, tmp_path, safe, shard):
    """What DeepSpeed's own convert_zero_checkpoint_to_fp32_state_dict writes (one pytorch_model.bin /
    model.safetensors, or shards + index) converts to the export of the DeepSpeed folder it came from. No training
    config comes with it: LoRA alpha is a flag."""
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    out = tmp_path / "fp32"
    convert_zero_checkpoint_to_fp32_state_dict(str(qwen_ds_buffers.parent), str(out), tag=qwen_ds_buffers.name,
                                               safe_serialization=safe, max_shard_size=shard)
    files = sorted(p.name for p in out.iterdir())
    ext = "safetensors" if safe else "bin"
    if shard:
        index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
        assert index in files and len(files) > 2, files
        assert set(json.loads((out / index).read_text())["weight_map"].values()) == set(files) - {index}
    else:
        assert files == (["model.safetensors"] if safe else ["pytorch_model.bin"])
    inputs = [out] + ([out / files[0]] if not shard else [])  # the folder, or the single file itself
    for i, ckpt in enumerate(inputs):
        res = convert_mmengine_to_hf(ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / f"exp{i}",
                                     progress=False, dtype="bfloat16", lora_alpha=fx.lora_alpha)
        assert res.report["coverage"]["unaccounted"] == []
        assert res.report["inputs"]["checkpoint"]["format"] in ("zero_to_fp32", "state-dict")
        check_export("sa2va-qwen2_5-vl/deepspeed-zero2", res.out_dir)
    assert ext in files[0] or ext in files[-1]


def test_zero_to_fp32_output_without_lora_alpha_is_a_one_line_error(fx, qwen_ds_buffers, tmp_path):
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    from maskport.errors import MissingInput

    out = tmp_path / "fp32"
    convert_zero_checkpoint_to_fp32_state_dict(str(qwen_ds_buffers.parent), str(out), tag=qwen_ds_buffers.name,
                                               safe_serialization=True)
    with pytest.raises(MissingInput, match="--lora-alpha"):
        convert_mmengine_to_hf(out, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / "x", progress=False,
                               dry_run=True)
