"""The embedded demo model (examples/tiny-sa2va): a really trained tiny Sa2VA, converted by maskport.

- the shipped artifacts are what the README says (a genuine mmengine checkpoint of the trainable subset, the base
  folder, Meta's SAM2 checkpoint, a held-out set in maskport's sample format) and fit in 30 MB;
- the training script builds the model inputs exactly as the export's ``predict_forward`` does;
- through the converter and the export, the model segments the held-out set (gIoU >= 0.70, [SEG] in >= 95% of
  the answers), and the same pipeline with the stage-2 fine-tune left out scores at least 0.20 gIoU lower on the
  stage-2 prompts: a converter that dropped the LoRA, the mask decoder or text_hidden_fcs would fail here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from maskport.demo import DemoArtifacts, build_without_stage2_checkpoint, evaluate_export

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-sa2va"

# a fixed subset keeps CI fast (the full held-out set is what `maskport demo` reports)
N_PER_TASK = 40


@pytest.fixture(scope="module")
def art():
    return DemoArtifacts.find(EXAMPLE / "artifacts")


def _convert(ckpt, art, out):
    from maskport.convert.api import convert_mmengine_to_hf

    # as `maskport demo` converts it: the example trained with float32 SAM2 normalisation ("exact")
    return convert_mmengine_to_hf(ckpt, base=art.base, sam2=art.sam2, out=out, dtype="fp32", progress=False,
                                  sam2_normalization="exact", log=lambda *_: None)


@pytest.fixture(scope="module")
def export_finetuned(demo_export):
    """conftest's demo_export: converted like _convert does (fp32, 'exact')."""
    from tests.golden import check_export

    check_export("demo/stage2", demo_export)
    return demo_export


@pytest.fixture(scope="module")
def export_without_stage2(art, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo-nostage2")
    ckpt = build_without_stage2_checkpoint(art, tmp / art.ckpt.name)
    out = tmp / "tiny-sa2va-without-stage2"
    _convert(ckpt, art, out)
    from tests.golden import check_export

    check_export("demo/without-stage2", out)
    return out


@pytest.fixture(scope="module")
def scores_finetuned(art, export_finetuned):
    return evaluate_export(export_finetuned, art.samples, limit_per_task=N_PER_TASK, progress=False,
                           tasks=["stage2", "stage1"])


# ------------------------------------------------------------------------------------------------ artifacts


def test_artifacts_fit_the_budget_and_are_complete(art):
    total = sum(p.stat().st_size for p in art.root.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024, f"demo artifacts take {total / 2**20:.1f} MB"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (art.base / name).is_file(), name
    assert art.sam2.with_suffix(".config.json").is_file()
    assert art.stage1_text_hidden_fcs.is_file()
    assert (EXAMPLE / "README.md").is_file() and (EXAMPLE / "train.py").is_file()


def test_checkpoint_is_a_genuine_mmengine_checkpoint_of_the_trainable_subset(art):
    from maskport.convert.safe_load import safe_torch_load

    ck = safe_torch_load(art.ckpt, mmap=False)
    assert {"meta", "state_dict", "message_hub"} <= set(ck)
    cfg = ck["meta"]["cfg"]
    for needle in ("special_tokens", "min_pixels", "max_pixels", "llm_lora", "CheckpointHook", "template = 'qwen_chat'"):
        assert needle in cfg, needle
    sd = ck["state_dict"]
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    groups = {"lora": 0, "mts": 0, "decoder": 0, "fcs": 0}
    for k in sd:
        if ".lora_A.default." in k or ".lora_B.default." in k:
            groups["lora"] += 1
        elif ".modules_to_save.default." in k:
            groups["mts"] += 1
        elif k.startswith("grounding_encoder.sam2_model.sam_mask_decoder."):
            groups["decoder"] += 1
        elif k.startswith("text_hidden_fcs."):
            groups["fcs"] += 1
        else:
            raise AssertionError(f"{k} is not part of Sa2VA's trainable subset")
    assert groups["mts"] == 2 and groups["fcs"] == 4 and groups["lora"] > 0 and groups["decoder"] > 0
    assert ck["meta"].get("iter") == int(art.ckpt.stem.split("_")[1])


def test_heldout_set_is_in_maskport_sample_format(art):
    from maskport.verify.samples import load_jsonl

    samples = load_jsonl(art.samples)
    assert len(samples) >= 100
    tasks = [json.loads(line)["task"] for line in art.samples.read_text().splitlines() if line.strip()]
    assert set(tasks) == {"stage2", "stage1"} and tasks.count("stage2") >= 100
    s = samples[0]
    assert s.prompt.startswith("<image>") and s.answer == "Sure, [SEG]."
    img, gt = s.image(), s.gt_mask()
    assert gt.shape == (img.height, img.width) and 0 < gt.sum() < gt.size


def test_training_inputs_match_the_exports_predict_forward_inputs(art, export_finetuned):
    """The training script's prompt, MLLM pixels and SAM2 pixels are the export's, token for token."""
    from transformers import AutoModel, AutoTokenizer

    import importlib.util

    sys.path.insert(0, str(EXAMPLE))  # model.py imports its sibling shapes.py ...
    saved = sys.modules.pop("shapes", None)
    try:
        spec = importlib.util.spec_from_file_location("tiny_sa2va_model", EXAMPLE / "model.py")
        tiny = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny)
    finally:
        sys.path.remove(str(EXAMPLE))
        # ... which must not stay in sys.modules as "shapes": benchmarks/convert has a shapes.py of its own
        sys.modules.pop("shapes", None)
        if saved is not None:
            sys.modules["shapes"] = saved
    from maskport.families.sa2va_qwen2_5_vl.remote.modeling_sa2va_qwen import build_prompt
    from maskport.verify.samples import load_jsonl

    m = AutoModel.from_pretrained(str(export_finetuned), trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(export_finetuned), trust_remote_code=True)
    assert m.config.sam2_image_size == tiny.SAM2_IMAGE_SIZE
    assert m.config.sam2_multimask_output is True
    assert (m.config.image_processor["min_pixels"], m.config.image_processor["max_pixels"]) == (
        tiny.MIN_PIXELS, tiny.MAX_PIXELS)
    for s in load_jsonl(art.samples)[:3]:
        image = s.image()
        sample = SimpleNamespace(image=image, prompt=s.prompt, answer=s.answer, mask=s.gt_mask(), family="new_colour")
        mine = tiny.Encoder(tok)(sample)
        mm = m._mllm_image_inputs(image)
        assert torch.equal(mm["pixel_values"], mine["pixel_values"])
        assert torch.equal(mm["image_grid_thw"], mine["image_grid_thw"])
        n = int(mm["image_grid_thw"].prod()) // 4
        ids = tok(build_prompt(m.config.template, s.prompt, "", n), add_special_tokens=False)["input_ids"]
        assert ids == mine["input_ids"][: len(ids)].tolist()
        answer = tok.decode(mine["input_ids"][len(ids):], skip_special_tokens=False)
        assert answer == "Sure, [SEG].<|im_end|>"
        sam_export = m.sam2_preprocess(image)[0]
        sam_train = tiny._GroundingEncoder.preprocess_image(mine["g_pixel_values"][None])[0]
        torch.testing.assert_close(sam_export, sam_train, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ quality


def test_converted_model_segments_the_heldout_set(scores_finetuned):
    ev = scores_finetuned
    assert ev.seg_rate >= 0.95, ev.as_dict()
    assert ev.giou >= 0.70, ev.as_dict()
    assert ev.by_task["stage2"]["giou"] >= 0.70, ev.as_dict()


def test_the_finetune_matters(art, export_without_stage2, scores_finetuned):
    """The same converter + predict_forward pipeline, with the stage-2 tensors set back to their values before
    stage 2 (LoRA B = 0, base embed/lm_head, base SAM2 mask decoder, stage-1 text_hidden_fcs)."""
    ev0 = evaluate_export(export_without_stage2, art.samples, tasks=["stage2"], limit_per_task=N_PER_TASK,
                          progress=False)
    with_ft = scores_finetuned.by_task["stage2"]["giou"]
    without = ev0.by_task["stage2"]["giou"]
    assert with_ft - without >= 0.20, (with_ft, without)


def test_without_stage2_checkpoint_restores_the_pre_finetune_tensors(art, tmp_path):
    from safetensors import safe_open

    from maskport.convert.safe_load import safe_torch_load

    ckpt = build_without_stage2_checkpoint(art, tmp_path / "x.pth")
    sd = safe_torch_load(ckpt, mmap=False)["state_dict"]
    orig = safe_torch_load(art.ckpt, mmap=False)["state_dict"]
    assert list(sd) == list(orig)
    assert all(sd[k].shape == orig[k].shape and sd[k].dtype == orig[k].dtype for k in sd)
    assert all(not sd[k].any() for k in sd if ".lora_B." in k)
    with safe_open(str(art.base / "model.safetensors"), framework="pt") as h:
        names = list(h.keys())
        emb = next(n for n in names if n.endswith("embed_tokens.weight"))
        assert torch.equal(sd[next(k for k in sd if "embed_tokens.modules_to_save" in k)], h.get_tensor(emb))
    sam = safe_torch_load(art.sam2, mmap=False)["model"]
    k = next(k for k in sd if k.startswith("grounding_encoder.sam2_model.sam_mask_decoder."))
    assert torch.equal(sd[k], sam[k[len("grounding_encoder.sam2_model."):]].to(sd[k].dtype))
    # and the fine-tune did change each group (otherwise the comparison above would prove nothing)
    for part in (".lora_B.", "embed_tokens.modules_to_save", "sam_mask_decoder.", "text_hidden_fcs."):
        keys = [k for k in sd if part in k]
        assert any(not torch.equal(sd[k], orig[k]) for k in keys), part


def test_demo_command_prints_scores_and_the_export(tmp_path):
    from click.testing import CliRunner

    from maskport.demo import demo_command

    out = tmp_path / "export"
    res = CliRunner().invoke(demo_command, ["-o", str(out), "--artifacts", str(EXAMPLE / "artifacts"), "--limit", "2",
                                            "--no-progress", "--json", "--show", "2"])
    assert res.exit_code == 0, res.output
    assert "gIoU" in res.output and "cIoU" in res.output and str(out.resolve()) in res.output
    numbers = json.loads(res.output.strip().splitlines()[-1])
    assert numbers["n"] == 4 and set(numbers["by_task"]) == {"stage2", "stage1"}
    assert (out / "config.json").is_file()


def test_demo_command_reports_missing_artifacts_in_one_line(tmp_path):
    from click.testing import CliRunner

    from maskport.demo import demo_command

    res = CliRunner().invoke(demo_command, ["--artifacts", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.startswith("error: demo artifacts") and len(res.output.strip().splitlines()) == 1


def test_batched_prediction_equals_one_by_one(art, export_finetuned):
    """``predict_forward`` with lists runs one left-padded batch: images of different sizes (so different numbers
    of image tokens and prompt lengths) and a text-only row give what one-by-one prediction gives."""
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    from tests.golden import assert_batched_equals_single

    model = AutoModel.from_pretrained(export_finetuned, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(export_finetuned, trust_remote_code=True)
    rows = [json.loads(line) for line in art.samples.read_text().splitlines()][:4]
    images = [Image.open(art.samples.parent / r["image"]).convert("RGB") for r in rows]
    images[1], images[2] = images[1].resize((150, 90)), images[2].resize((64, 200))
    texts = [r["prompt"] for r in rows]
    assert len({im.size for im in images}) >= 3
    out = assert_batched_equals_single(model, tok, images + [None], texts + ["What colour is the circle?"])
    assert all(len(o["prediction_masks"]) == 1 for o in out[:4]) and out[4]["prediction_masks"] == []


@pytest.mark.parametrize("cpu_budget", ["1MB", "9MB"])
def test_offloaded_export_predicts_the_same(art, export_finetuned, tmp_path, cpu_budget):
    """``device_map="auto"`` with a memory limit that offloads the export to disk (all of it, or part of it with
    the rest on the CPU): ``predict_forward`` works and gives the same answer and masks as the model in memory
    (it failed with "Tensor.item() cannot be called on meta tensors" before)."""
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_finetuned, trust_remote_code=True)
    row = json.loads(art.samples.read_text().splitlines()[0])
    image = Image.open(art.samples.parent / row["image"]).convert("RGB")
    ref = AutoModel.from_pretrained(export_finetuned, trust_remote_code=True, dtype=torch.float32).eval()
    want = ref.predict_forward(image=image, text=row["prompt"], tokenizer=tok, return_probabilities=True)
    off = AutoModel.from_pretrained(export_finetuned, trust_remote_code=True, dtype=torch.float32,
                                    device_map="auto", max_memory={"cpu": cpu_budget},
                                    offload_folder=str(tmp_path / "offload")).eval()
    placed = set(getattr(off, "hf_device_map", {}).values())
    assert "disk" in placed and (cpu_budget == "1MB" or "cpu" in placed), placed
    assert any(p.device.type == "meta" for p in off.parameters())  # really offloaded
    got = off.predict_forward(image=image, text=row["prompt"], tokenizer=tok, return_probabilities=True)
    assert got["prediction"] == want["prediction"] and len(got["prediction_masks"]) == 1
    assert (got["prediction_masks"][0] == want["prediction_masks"][0]).all()
    assert abs(got["prediction_probabilities"][0] - want["prediction_probabilities"][0]).max() <= 1e-5
    batch = off.predict_forward(image=[image, image], text=[row["prompt"]] * 2, tokenizer=tok)
    assert [b["prediction"] for b in batch] == [want["prediction"]] * 2
