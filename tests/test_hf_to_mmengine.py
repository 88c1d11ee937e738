"""``maskport convert hf-to-mmengine``: an export (or a released folder) back to the ``.pth`` Sa2VA's training loads
as ``pretrained_pth``. Oracles: peft's own ``merge_and_unload`` of the fixtures' trained models, the genuine
mmengine module of the Qwen fixture loading the file with mmengine's ``load_checkpoint`` and then wrapped by peft as
Sa2VA wraps it, and the InternVL family's own ``--pretrained-pth`` conversion (a run continued from the file)."""

from __future__ import annotations

import copy
import hashlib
import re

import pytest
import torch
from click.testing import CliRunner

from maskport.cli import main
from maskport.convert import ops
from maskport.convert.inverse import NotInvertible, TrainingLayout, convert_hf_to_mmengine, invert, inverse_op
from maskport.convert.plan import build_plan
from maskport.convert.rules import Apply, DropRest, LoraMerge, Rename
from maskport.convert.sources import StateDictSource as DictSource

# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
_PEFT_NAMES = [(re.compile(r"\.base_model\.model\."), "."), (re.compile(r"\.lora_[AB]\.default\.weight$"), ".weight"),
               (re.compile(r"\.modules_to_save\.default\."), "."), (re.compile(r"\.base_layer\."), ".")]


def unwrapped(key: str) -> str:
    """A training-checkpoint key (peft-wrapped) -> the module name Sa2VA has before wrapping (written out here,
    independently of the families' tables)."""
    for rx, new in _PEFT_NAMES:
        key = rx.sub(new, key)
    return key


def back(folder, out, **kw):
    return convert_hf_to_mmengine(folder, out=out, progress=False, **kw)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    err = r.stderr if hasattr(r, "stderr") else r.output
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)


# ----------------------------------------------------------------------------------------------------------------
# the engine: inverse ops and tables
# ----------------------------------------------------------------------------------------------------------------
def test_grouped_qkv_concat_inverts_the_split_and_matches_the_grouped_layout():
    heads, kv, d, cols = 8, 2, 3, 5
    q, k, v = torch.randn(heads * d, cols), torch.randn(kv * d, cols), torch.randn(kv * d, cols)
    fused = ops.GroupedQkvConcat(heads, kv).compute([q, k, v])[0]
    # independent: for each key-value head h, its heads/kv query heads, then its key head, then its value head
    groups = heads // kv
    rows = []
    for h in range(kv):
        rows += [q[(h * groups + g) * d:(h * groups + g + 1) * d] for g in range(groups)]
        rows += [k[h * d:(h + 1) * d], v[h * d:(h + 1) * d]]
    assert torch.equal(fused, torch.cat(rows))
    assert all(torch.equal(a, b) for a, b in zip(ops.GroupedQkvSplit(heads, kv).compute([fused]), (q, k, v)))
    assert ops.GroupedQkvConcat(heads, kv).shapes([q.shape, k.shape, v.shape]) == [tuple(fused.shape)]
    bias = torch.randn((heads + 2 * kv) * d)
    assert torch.equal(ops.GroupedQkvConcat(heads, kv).compute(ops.GroupedQkvSplit(heads, kv).compute([bias]))[0], bias)
    with pytest.raises(ValueError):
        ops.GroupedQkvConcat(heads, kv).shapes([q.shape, k.shape, (kv * d + 1, cols)])


def test_inverse_ops():
    assert isinstance(inverse_op(ops.Split(0, 3))[0], ops.Concat)
    inv, merged = inverse_op(ops.Chain(ops.LoraMerge(2.0), ops.GroupedQkvSplit(4, 2)))
    assert merged and isinstance(inv, ops.GroupedQkvConcat)
    inv, merged = inverse_op(ops.LoraMerge(2.0))
    assert merged and isinstance(inv, ops.Identity)
    with pytest.raises(NotInvertible):
        inverse_op(ops.Concat(0))
    with pytest.raises(NotInvertible):
        inverse_op(ops.Duplicate(2))


def test_invert_a_small_table_and_plan_it():
    """Forward: base + LoRA -> merged weight, a trained copy renamed, a split of a trained tensor, a frozen copy.
    Inverse: the merged weight under the layer's name, the copy back, the pieces concatenated; the frozen tensor
    dropped with the layout's reason."""
    fwd = [LoraMerge("m.layers.{i}.w", base="base:layers.{i}.w", a="ckpt:wrap.layers.{i}.lora_A.default.weight",
                     b="ckpt:wrap.layers.{i}.lora_B.default.weight", scaling=2.0),
           Rename("head.{p}", "ckpt:wrap.head.modules_to_save.default.{p}"),
           Apply(("q.{p}", "k.{p}"), ("ckpt:qk.{p}",), ops.Split(0, 2)),
           Rename("frozen.{p}", "base:frozen.{p}")]
    layout = TrainingLayout(fwd, "ckpt", renames=(("wrap.", "plain."), (".lora_A.default.", "."),
                                                   (".modules_to_save.default.", ".")), frozen_reason="frozen!")
    table = invert(layout)
    assert [type(r).__name__ for r in table] == ["Rename", "Rename", "Apply", "DropRest"]
    assert table[0] == Rename("plain.layers.{i}.weight", "export:m.layers.{i}.w")
    x = {"m.layers.0.w": torch.randn(4, 3), "m.layers.1.w": torch.randn(4, 3), "head.weight": torch.randn(2, 2),
         "q.weight": torch.randn(2, 3), "k.weight": torch.randn(2, 3), "frozen.bias": torch.randn(3)}
    src = DictSource("export", "mem", x, "test")
    plan = build_plan(table, {"export": src}, out_dtype=torch.float32)
    got = {t: out for ps in plan.steps for t, out in zip(ps.step.targets, ps.step.compute(
        [src.load(r.key) for r in ps.step.inputs]))}
    assert set(got) == {"plain.layers.0.weight", "plain.layers.1.weight", "plain.head.weight", "qk.weight"}
    assert torch.equal(got["plain.layers.1.weight"], x["m.layers.1.w"])
    assert torch.equal(got["qk.weight"], torch.cat([x["q.weight"], x["k.weight"]]))
    assert [(str(r), why) for r, why in plan.drops] == [("export:frozen.bias", "frozen!")]
    # a trained tensor copied by CopyRest, or an op without inverse, is refused (not guessed)
    with pytest.raises(NotInvertible):
        invert(TrainingLayout([Apply(("a",), ("ckpt:x", "ckpt:y"), ops.Concat(0))], "ckpt"))


def test_drop_rest_takes_only_what_no_rule_claimed():
    src = DictSource("s", "mem", {"a": torch.zeros(1), "b": torch.zeros(1)}, "t")
    plan = build_plan([Rename("A", "s:a"), DropRest("s:{rest}", reason="r")], {"s": src}, out_dtype=torch.float32)
    assert list(plan.targets) == ["A"] and [str(r) for r, _ in plan.drops] == ["s:b"]


def test_atomic_output_file(tmp_path):
    from maskport.errors import MissingInput
    from maskport.io import atomic_output_file

    out = tmp_path / "x.pth"
    with pytest.raises(RuntimeError):
        with atomic_output_file(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_file(out) as tmp:
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [out]
    with pytest.raises(MissingInput, match="already exists"):
        with atomic_output_file(out):
            pass
    with atomic_output_file(out, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    with pytest.raises(MissingInput, match="is a folder"):
        with atomic_output_file(tmp_path, overwrite=True):
            pass


# ----------------------------------------------------------------------------------------------------------------
# Sa2VA-Qwen2.5-VL (the session fixture: a genuine mmengine run)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_pth(export_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("back") / "sa2va_qwen.pth"
    res = back(export_fp32.out_dir, out)
    assert res.out == out
    return out, res


def _qwen_merged_reference(fx) -> dict[str, torch.Tensor]:
    """Sa2VA's module names before LoRA -> values: peft's merge of the fixture's trained model, the trained SAM2
    mask decoder and text_hidden_fcs."""
    merged = copy.deepcopy(fx.peft_model).merge_and_unload()
    ref = {"mllm.model." + k: v for k, v in merged.state_dict().items()}
    ref.update({"grounding_encoder.sam2_model." + k: v for k, v in fx.meta_sam2.state_dict().items()})
    ref.update({"text_hidden_fcs." + k: v for k, v in fx.text_hidden_fcs.state_dict().items()})
    return ref


def test_qwen_round_trip_gives_the_trained_tensors(fx, qwen_pth):
    """iter_N.pth -> export -> .pth: every tensor the training checkpoint holds is there under its un-wrapped name
    (LoRA merged, as peft merges it; modules_to_save copies, mask decoder and text_hidden_fcs bit-equal), and
    nothing frozen is."""
    out, res = qwen_pth
    sd = load(out)
    ckpt = torch.load(fx.ckpt, map_location="cpu", weights_only=False)["state_dict"]
    trained = {unwrapped(k) for k in ckpt}
    assert trained <= set(sd), sorted(trained - set(sd))[:5]
    ref = _qwen_merged_reference(fx)
    assert set(sd) <= set(ref), sorted(set(sd) - set(ref))[:5]
    lora_layers = {unwrapped(k) for k in ckpt if ".lora_A." in k}
    assert len(lora_layers) == 14
    for k, v in sd.items():
        assert v.dtype == torch.float32 and tuple(v.shape) == tuple(ref[k].shape), k
        if k in lora_layers:
            torch.testing.assert_close(v, ref[k].float(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, ref[k].float()), k
    # the merged layers differ from the un-merged base weights: LoRA is really in them
    peft_sd = fx.peft_model.state_dict()
    for k in lora_layers:
        base = peft_sd["base_model.model." + k[len("mllm.model."):].replace(".weight", ".base_layer.weight")]
        assert (sd[k] - base.float()).abs().max() > 1e-4, k
    assert not any(k.startswith(("mllm.model.model.visual.", "grounding_encoder.sam2_model.image_encoder."))
                   for k in sd)
    assert res.dropped > 0 and res.tensors == len(sd)


def test_qwen_pth_loads_into_the_genuine_mmengine_module_and_continues_with_peft(fx, qwen_pth):
    """Sa2VA's order: build the module from the base and SAM2 (no LoRA yet), load pretrained_pth with mmengine's
    loader (strict=False), then wrap LoRA with peft. No trainable tensor is missing, nothing is unexpected, and the
    wrapped model (fresh LoRA) computes what the trained model computed."""
    from mmengine.runner.checkpoint import load_checkpoint
    from peft import get_peft_model
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from maskport.testing.sa2va_qwen2_5_vl import SPECIAL_TOKENS, _build_lora_config, _build_sa2va_module_class
    from maskport.testing.sam2 import build_meta_sam2

    out, _ = qwen_pth
    tok = AutoTokenizer.from_pretrained(str(fx.base_dir))
    tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(fx.base_dir), dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    sam2 = build_meta_sam2(fx.sam2_meta_config)
    sam2.load_state_dict(torch.load(fx.sam2_pt, map_location="cpu", weights_only=True)["model"])
    module = _build_sa2va_module_class()(model, sam2, tok.convert_tokens_to_ids("[SEG]"))
    torch.nn.init.zeros_(module.text_hidden_fcs[0].weight)  # nothing left from construction can pass for loaded

    sd = load(out)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    assert unexpected == []
    trainable = {unwrapped(k) for k in torch.load(fx.ckpt, map_location="cpu", weights_only=False)["state_dict"]}
    assert not trainable & set(missing)
    load_checkpoint(module, str(out), map_location="cpu", strict=False)  # mmengine's own loader, as a run uses
    own = torch.nn.Module.state_dict(module)  # every tensor (the module's own state_dict keeps the trained ones)
    assert all(torch.equal(own[k], sd[k]) for k in sd)

    module.mllm.model = get_peft_model(module.mllm.model, _build_lora_config())  # Sa2VA wraps after loading
    module.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, len(tok) - 5, 8]])
    with torch.no_grad():
        got = module.mllm.model(input_ids=ids).logits
        ref = fx.peft_model(input_ids=ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    # the Sa2VA checkpoint override of the continued run holds the loaded copies as its modules_to_save
    mts = {unwrapped(k): v for k, v in module.state_dict().items() if ".modules_to_save." in k}
    assert mts and all(torch.equal(v.float(), sd[k].to(torch.bfloat16).float()) for k, v in mts.items())
    for name in ("text_hidden_fcs.0.weight", "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"):
        assert torch.equal(torch.nn.Module.state_dict(module)[name], sd[name])


def test_qwen_dry_run_writes_nothing_and_cli_reports(export_fp32, tmp_path):
    out = tmp_path / "x.pth"
    res = back(export_fp32.out_dir, out, dry_run=True)
    assert not out.exists() and res.tensors > 100
    r = CliRunner().invoke(main, ["convert", "hf-to-mmengine", str(export_fp32.out_dir), "-o", str(out),
                                  "--dtype", "bf16", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "sa2va-qwen2_5-vl" in r.output and "LoRA is merged" in r.output and f"wrote {out}" in r.output
    sd = load(out)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}


def test_errors_are_one_line_and_inputs_are_never_overwritten(fx, export_bf16, tmp_path):
    folder = export_bf16.out_dir
    before = {p.name: sha(p) for p in folder.iterdir() if p.is_file()}
    run = lambda *a: CliRunner().invoke(main, ["convert", "hf-to-mmengine", *map(str, a), "--no-progress"])  # noqa: E731
    assert_one_line_error(run(folder, "-o", folder / "model.safetensors", "--overwrite"), "is inside the input")
    assert_one_line_error(run(folder, "-o", folder / "new.pth"), "is inside the input")
    assert_one_line_error(run(tmp_path / "nope", "-o", tmp_path / "a.pth"), "does not exist")
    assert_one_line_error(run(fx.base_dir, "-o", tmp_path / "a.pth"), "neither a maskport export")
    assert_one_line_error(run(folder, "-o", tmp_path), "is a folder")
    assert_one_line_error(run(folder), "-o/--out is required")
    assert_one_line_error(run(folder, "-o", tmp_path / "a.pth", "--sam2-config", fx.sam2_pt), "only for a released")
    import json
    import shutil

    quantized = tmp_path / "q"
    shutil.copytree(folder, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    assert_one_line_error(run(quantized, "-o", tmp_path / "a.pth"), "quantized export (gptq)")
    shutil.rmtree(quantized)
    existing = tmp_path / "existing.pth"
    existing.write_bytes(b"keep me")
    assert_one_line_error(run(folder, "-o", existing), "already exists")
    assert existing.read_bytes() == b"keep me"
    assert {p.name: sha(p) for p in folder.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.pth"]  # no partial file left behind
    r = run(folder, "-o", existing, "--overwrite")
    assert r.exit_code == 0, r.output
    assert set(load(existing)) and {p.name: sha(p) for p in folder.iterdir() if p.is_file()} == before


# ----------------------------------------------------------------------------------------------------------------
# Sa2VA-InternVL (Qwen2 and InternLM2 language models; released folders)
# ----------------------------------------------------------------------------------------------------------------
def _internvl(tmp_path_factory, llm):
    from maskport.convert.api import convert_mmengine_to_hf
    from maskport.testing.sa2va_internvl import make_internvl_fixture

    root = tmp_path_factory.mktemp(f"back_internvl_{llm}")
    tok_dir = None
    if llm == "internlm2":
        from maskport.testing.sa2va_internvl import make_internlm2_tokenizer_dir

        tok_dir = make_internlm2_tokenizer_dir(root / "tok")
    fx = make_internvl_fixture(root / "fx", llm=llm, version="v2", tokenizer_dir=tok_dir)
    exp = root / "export"
    convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=exp, dtype="fp32", progress=False)
    return fx, exp


@pytest.fixture(scope="module")
def internvl_qwen(tmp_path_factory):
    return _internvl(tmp_path_factory, "qwen2")


@pytest.fixture(scope="module")
def internvl_lm2(tmp_path_factory):
    return _internvl(tmp_path_factory, "internlm2")


def _internvl_reference(fx) -> dict[str, torch.Tensor]:
    oracle = copy.deepcopy(fx.oracle)
    oracle.language_model = oracle.language_model.merge_and_unload()
    ref = {"mllm.model." + k: v for k, v in oracle.state_dict().items()}
    ref.update({"grounding_encoder.sam2_model." + k: v for k, v in fx.sam2.state_dict().items()})
    ref.update({"text_hidden_fcs." + k: v for k, v in fx.text_hidden_fcs.state_dict().items()})
    return ref


@pytest.mark.parametrize("which", ["internvl_qwen", "internvl_lm2"])
def test_internvl_round_trip_gives_the_trained_tensors(request, which, tmp_path):
    """Checkpoint -> export -> .pth: the remote-code InternVLChatModel names Sa2VA trains (InternLM2's fused wqkv put
    back together from the export's q/k/v), LoRA merged as peft merges it, the rest bit-equal."""
    fx, exp = request.getfixturevalue(which)
    out = tmp_path / "back.pth"
    back(exp, out)
    sd = load(out)
    trained = {unwrapped(k) for k in fx.state_dict}
    assert trained <= set(sd), sorted(trained - set(sd))[:5]
    ref = _internvl_reference(fx)
    assert set(sd) <= set(ref), sorted(set(sd) - set(ref))[:5]
    lora_layers = {unwrapped(k) for k in fx.state_dict if ".lora_A." in k}
    if fx.llm == "internlm2":
        assert any(k.endswith("attention.wqkv.weight") for k in lora_layers)
    for k, v in sd.items():
        if k in lora_layers:
            torch.testing.assert_close(v, ref[k].float(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, ref[k].float()), k
    assert not any(k.startswith(("mllm.model.vision_model.", "grounding_encoder.sam2_model.image_encoder."))
                   for k in sd)


def test_internvl_pth_continues_training_and_converts_back_to_itself(internvl_qwen, tmp_path):
    """The fixed point: .pth -> a run continued from it (Sa2VA loads it, then wraps fresh LoRA: B = 0, the
    modules_to_save copies, projector, mask decoder and text_hidden_fcs as loaded) -> its checkpoint converted with
    --pretrained-pth .pth -> export -> .pth: the same tensors, bit for bit."""
    from maskport.convert.api import convert_mmengine_to_hf

    fx, exp = internvl_qwen
    pth1 = tmp_path / "one.pth"
    back(exp, pth1)
    sd1 = load(pth1)
    cont = {}
    for k, v in fx.state_dict.items():  # what Sa2VA's state_dict() saves right after wrapping: fresh LoRA
        if ".lora_B." in k:
            cont[k] = torch.zeros_like(v)
        elif ".lora_A." in k:
            cont[k] = torch.randn(v.shape)
        else:
            cont[k] = sd1[unwrapped(k)].clone()
    ck = tmp_path / "iter_0.pth"
    torch.save({"state_dict": cont, "meta": torch.load(fx.ckpt, weights_only=False)["meta"]}, ck)
    exp2 = tmp_path / "export2"
    convert_mmengine_to_hf(ck, base=fx.base_dir, sam2=fx.sam2_pt, out=exp2, dtype="fp32", pretrained_pth=pth1,
                           progress=False)
    pth2 = tmp_path / "two.pth"
    back(exp2, pth2)
    sd2 = load(pth2)
    assert list(sd1) == list(sd2)
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_released_folder_gives_the_same_pth(internvl_qwen, tmp_path):
    """A released Sa2VA folder (what Sa2VA's own HF script writes; its remote code raises if run) -> the same .pth
    as the export of the training checkpoint; the temporary native export is removed."""
    from maskport.testing.sa2va_internvl import make_released_folder

    fx, exp = internvl_qwen
    rel = make_released_folder(fx, tmp_path / "released")
    a, b = tmp_path / "out" / "from_release.pth", tmp_path / "from_export.pth"
    res = back(rel, a, sam2_config=fx.sam2_pt.with_suffix(".config.json"))  # the tiny SAM2 is no preset
    back(exp, b)
    sa, sb = load(a), load(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)
    assert "released folder" in res.notes[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["from_release.pth"]


# ----------------------------------------------------------------------------------------------------------------
# io/torch_zip.py: torch's format, one tensor at a time
# ----------------------------------------------------------------------------------------------------------------
def _specs(sd):
    return [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]


def test_torch_zip_reads_back_with_torch_load_and_mmap(tmp_path):
    import struct
    import zipfile

    from maskport.io.torch_zip import save_tensors

    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(3, 5, generator=g).to(torch.bfloat16), "ids": torch.arange(7), "s": torch.tensor(3.5),
          "empty": torch.zeros(0, 4), "mask": torch.rand(10, generator=g) > 0.5,
          "h": torch.randn(2, 3, 4, generator=g).half(), "d": torch.randn(4, generator=g).double(),
          "i8": torch.randint(-5, 5, (6,), generator=g, dtype=torch.int8)}
    p = tmp_path / "t.pth"
    save_tensors(p, _specs(sd), iter(sd.items()))
    for mmap in (False, True):
        got = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
        assert list(got) == list(sd) and type(got) is dict
        for k in sd:
            assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k
    raw = p.read_bytes()
    with zipfile.ZipFile(p) as z:  # every record's data starts at a multiple of 64 bytes, as torch aligns it
        for info in z.infolist():
            n, e = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            assert (info.header_offset + 30 + n + e) % 64 == 0, info.filename
            assert info.compress_type == zipfile.ZIP_STORED
        # the same records torch.save writes for the same dict
        ref = tmp_path / "ref.pth"
        torch.save(sd, ref)
        with zipfile.ZipFile(ref) as zr:  # (torch names the archive folder after the file)
            assert {i.filename.split("/", 1)[1] for i in z.infolist()} <= {i.filename.split("/", 1)[1]
                                                                         for i in zr.infolist()}
            assert all(z.read(f"archive/data/{i}") == zr.read(f"ref/data/{i}") for i in range(len(sd)))


def test_torch_zip_streams_one_tensor_at_a_time_and_checks_specs(tmp_path):
    import weakref

    from maskport.io.torch_zip import save_tensors

    specs = [(f"t{i}", torch.float32, (256, 256)) for i in range(6)]
    alive: list = []

    def produce():
        for name, _, shape in specs:
            assert all(r() is None for r in alive), "an earlier tensor is still held"
            t = torch.full(shape, float(len(alive)))
            alive.append(weakref.ref(t))
            yield name, t
            del t

    save_tensors(tmp_path / "a.pth", specs, produce())
    got = torch.load(tmp_path / "a.pth", weights_only=True)
    assert [float(got[f"t{i}"][0, 0]) for i in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="expected t1"):
        save_tensors(tmp_path / "b.pth", specs[:2], iter([("t0", torch.zeros(256, 256)), ("t1", torch.zeros(2))]))
    with pytest.raises(ValueError, match="no tensor given"):
        save_tensors(tmp_path / "c.pth", specs[:2], iter([("t0", torch.zeros(256, 256))]))
    with pytest.raises(ValueError, match="cannot be written"):
        save_tensors(tmp_path / "d.pth", [("x", torch.complex64, (1,))], iter([]))


def test_released_folder_dry_run_writes_nothing_beside_it(internvl_qwen, tmp_path):
    from maskport.testing.sa2va_internvl import make_released_folder

    fx, _ = internvl_qwen
    rel = make_released_folder(fx, tmp_path / "released")
    before = sorted(p.name for p in tmp_path.iterdir()), {p.name: sha(p) for p in rel.iterdir()}
    res = back(rel, None, dry_run=True, sam2_config=fx.sam2_pt.with_suffix(".config.json"))
    assert res.out is None and res.tensors > 0 and res.family == "sa2va-internvl"
    assert (sorted(p.name for p in tmp_path.iterdir()), {p.name: sha(p) for p in rel.iterdir()}) == before
