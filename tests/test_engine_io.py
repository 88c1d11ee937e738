"""The engine's I/O paths: positional reads (no memory mapping) give exactly what torch.load / safetensors give,
the buffer pool keeps its budget and reuses memory, the write/hash threads report errors instead of hanging."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from maskport.convert import ops, safe_load, sources, writer
from maskport.convert.plan import build_plan
from maskport.convert.rules import CopyRest, LoraMerge, Rename
from maskport.heads.sam2 import open_sam2_checkpoint
from maskport.convert.sources import (SafetensorsSource, TorchFileSource, open_hf_folder,
                                      open_training_checkpoint, read_safetensors_header)
from maskport.errors import UnreadableFile


def _odd_state_dict():
    torch.manual_seed(0)
    base = torch.arange(1000, dtype=torch.float32)
    big = torch.randn(700, 513)
    return OrderedDict(
        w=torch.randn(64, 48).bfloat16(),
        view=base[10:250],                      # a view into a larger, shared storage
        base=base,
        strided=base[5:905:3],                  # step > 1
        t=torch.randn(40, 33).t(),              # non-contiguous
        big_t=big.t(),                          # non-contiguous, > 1 MiB
        block=big[100:300, 7:400],              # 2-D window of a storage
        boolean=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5, dtype=torch.float16),
        empty=torch.zeros(0, 3),
        ints=torch.arange(17, dtype=torch.int64).reshape(1, 17),
        u8=torch.arange(200, dtype=torch.uint8),
        f8=torch.randn(8, 8).to(torch.float8_e4m3fn),
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def test_torch_file_reads_at_offsets_match_torch_load(tmp_path):
    sd = _odd_state_dict()
    p = tmp_path / "iter_1.pth"
    torch.save({"state_dict": sd, "meta": {"cfg": "r = 4\n"}}, p)
    ck = open_training_checkpoint(p)
    src = ck.source
    assert isinstance(src, TorchFileSource)
    assert src.located == len(sd) - 1  # every tensor with bytes (``empty`` has none) is read at an offset
    ref = torch.load(p, weights_only=True)["state_dict"]
    for k in sd:
        got = src.load(k)
        assert _same(got, ref[k]), k
        assert tuple(got.stride()) == tuple(ref[k].stride()), k
    # a caller-provided buffer is used, and reads are repeatable
    buf = torch.empty(src.buffer_nbytes("big_t") + 100, dtype=torch.uint8)
    got = src.load_into("big_t", buf)
    assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert _same(got, ref["big_t"]) and _same(src.load("big_t"), ref["big_t"])
    src.close()


def test_fallback_through_the_mapping_is_exact_and_repeatable(tmp_path, monkeypatch):
    sd = _odd_state_dict()
    p = tmp_path / "sam2.pt"
    torch.save({"model": sd}, p)
    monkeypatch.setattr(sources, "locate_storages", lambda *a, **k: {})
    src = open_sam2_checkpoint(p)
    assert src.located == 0
    ref = torch.load(p, weights_only=True)["model"]
    for _ in range(2):  # pages released after the first read come back from the file
        for k in sd:
            assert _same(src.load(k), ref[k]), k


def test_legacy_and_in_memory_tensors_are_never_released(tmp_path):
    p = tmp_path / "legacy.pth"
    sd = {"w": torch.randn(600, 600)}  # > 1 page; a legacy file is loaded into ordinary memory
    torch.save({"state_dict": sd}, p, _use_new_zipfile_serialization=False)
    src = open_training_checkpoint(p).source
    for _ in range(2):
        assert torch.equal(src.load("w"), sd["w"])


def test_locate_refuses_tensors_that_are_not_from_the_file(tmp_path):
    p = tmp_path / "a.pt"
    torch.save({"x": torch.randn(100)}, p)
    assert safe_load.locate_storages(p, [torch.randn(100)]) == {}
    loaded = torch.load(p, mmap=True, weights_only=True)
    (off,) = safe_load.locate_storages(p, [loaded["x"]]).values()
    assert (off, 400) in safe_load.zip_data_records(p).values()


def test_hf_bin_folder_reads_at_offsets(tmp_path):
    a, b = {"x": torch.randn(300, 7)}, {"y": torch.randn(5).bfloat16()}
    torch.save(a, tmp_path / "pytorch_model-1.bin")
    torch.save(b, tmp_path / "pytorch_model-2.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        '{"weight_map": {"x": "pytorch_model-1.bin", "y": "pytorch_model-2.bin"}}')
    src = open_hf_folder(tmp_path)
    assert src.located == 2
    assert torch.equal(src.load("x"), a["x"]) and torch.equal(src.load("y"), b["y"])


def test_safetensors_reads_match_safe_open(tmp_path):
    sd = {k: v.contiguous() for k, v in _odd_state_dict().items() if k not in ("view", "base", "strided")}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    src = open_hf_folder(tmp_path)
    assert isinstance(src, SafetensorsSource)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            assert src.info(k).shape == tuple(f.get_slice(k).get_shape())
            assert _same(src.load(k), f.get_tensor(k)), k
    entries, meta = read_safetensors_header(tmp_path / "model.safetensors")
    assert meta == {"format": "pt"} and set(entries) == set(sd)


@pytest.mark.parametrize("damage", ["truncated", "bad_json", "huge_header", "bad_offsets", "short"])
def test_damaged_safetensors_are_refused(tmp_path, damage):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, f)
    raw = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(raw[:-100])
    elif damage == "bad_json":
        f.write_bytes(raw[:8] + b"x" + raw[9:])
    elif damage == "huge_header":
        f.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    elif damage == "bad_offsets":
        f.write_bytes(raw.replace(b'"data_offsets":[0,16384]', b'"data_offsets":[0,16380]'))
    else:
        f.write_bytes(raw[:5])
    with pytest.raises(UnreadableFile, match="safetensors"):
        open_hf_folder(tmp_path)


# --------------------------------------------------------------------------------------------------
# writer: pool, LoRA paths, threads
# --------------------------------------------------------------------------------------------------

def test_pool_reuses_buffers_and_waits_within_its_budget():
    mib = 1 << 20
    pool = writer._Pool(10 * mib)
    (a,) = pool.take([4 * mib])
    (b,) = pool.take([4 * mib])
    got = []
    th = threading.Thread(target=lambda: got.append(pool.take([4 * mib])[0]))
    th.start()
    time.sleep(0.3)
    assert th.is_alive() and not got  # 12 MiB would exceed the budget: waits
    pool.give([a])
    th.join(5)
    assert got and got[0] is a  # the returned buffer, not fresh memory
    assert pool.take([100])[0] is None  # small requests are not pooled
    pool.give([b, got[0]])
    assert pool.used == 0 and pool.peak <= 10 * mib


def _file_plan(tmp_path, out_dtype):
    torch.manual_seed(1)
    base = {"lin.weight": torch.randn(1024, 512).bfloat16(), "norm.weight": torch.randn(512).bfloat16(),
            "big.weight": torch.randn(1500, 700).bfloat16()}
    lora = {"A": torch.randn(8, 512).bfloat16(), "B": torch.randn(1024, 8).bfloat16(),
            "extra": torch.randn(600, 900).t()}  # fp32, non-contiguous, > 1 MiB
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    torch.save({"state_dict": lora}, tmp_path / "ck.pth")
    srcs = {"base": open_hf_folder(tmp_path / "base"), "ck": open_training_checkpoint(tmp_path / "ck.pth").source}

    rules = [LoraMerge(target="lin.weight", base="base:lin.weight", a="ck:A", b="ck:B", scaling=0.75),
             Rename(target="extra", source="ck:extra"),
             CopyRest(target="{rest}", source="base:{rest}")]
    return build_plan(rules, srcs, out_dtype=out_dtype), base, lora


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pooled_writer_matches_the_plain_computation(tmp_path, out_dtype):
    plan, base, lora = _file_plan(tmp_path, out_dtype)
    out = tmp_path / "out"
    out.mkdir()
    writer.write_shards(plan, out, max_shard_size=10**9)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    merged = ops.lora_merge(base["lin.weight"], lora["A"], lora["B"], 0.75).to(out_dtype)
    assert torch.equal(got["lin.weight"], merged)
    assert torch.equal(got["extra"], lora["extra"].to(out_dtype))
    for k in ("norm.weight", "big.weight"):
        assert torch.equal(got[k], base[k].to(out_dtype)), k


def test_writer_thread_errors_surface_and_nothing_hangs(tmp_path, monkeypatch):
    plan, _, _ = _file_plan(tmp_path, torch.bfloat16)
    out = tmp_path / "out"
    out.mkdir()

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write_all", full)
    t0 = time.time()
    with pytest.raises(OSError, match="No space left"):
        writer.write_shards(plan, out, max_shard_size=10**9)
    assert time.time() - t0 < 30
    assert not [t for t in threading.enumerate() if t.name.startswith("maskport-")]


def test_step_errors_stop_the_threads(tmp_path):
    from maskport.errors import ShapeMismatch

    plan, _, _ = _file_plan(tmp_path, torch.bfloat16)
    plan.steps[-1].output_infos[0] = sources.TensorInfo((1, 2), torch.bfloat16)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ShapeMismatch):
        writer.write_shards(plan, out, max_shard_size=10**9)
    assert not [t for t in threading.enumerate() if t.name.startswith("maskport-")]
    assert torch.get_num_threads() >= 1


def test_pool_budget_covers_the_largest_step(tmp_path):
    plan, _, _ = _file_plan(tmp_path, torch.float16)
    need = max(sum(writer._round(n) for n in writer._step_buffer_plan(ps, plan)[0] if n >= writer._SMALL)
               for ps in plan.steps)
    assert writer.pool_budget(plan) == max(need, writer.MIN_BUDGET)
    assert need < writer.MIN_BUDGET  # renamed tensors (passthrough) need no buffer


def test_write_order_interleaves_merges_with_copies(tmp_path):
    plan, _, _ = _file_plan(tmp_path, torch.bfloat16)
    order = writer.write_order(plan)
    assert sorted(map(id, order)) == sorted(map(id, plan.steps))
    merges = [ps for ps in order if ps.step.op_name.startswith("lora_merge")]
    others = [ps for ps in order if not ps.step.op_name.startswith("lora_merge")]
    assert merges == [ps for ps in plan.steps if ps in merges]
    assert others == [ps for ps in plan.steps if ps in others]
    assert order[0] in merges and order[-1] in others  # mixed, not all merges first
    assert writer.write_order(plan) == order


def _shard_bytes(out):
    return (out / "model.safetensors").read_bytes()


def _write(plan, out, **kw):
    out.mkdir()
    shards = writer.write_shards(plan, out, max_shard_size=10**9, **kw)
    return shards, _shard_bytes(out)


def test_file_spans_are_exactly_the_tensors_bytes(tmp_path):
    import os

    sd = _odd_state_dict()
    p = tmp_path / "iter_1.pth"
    torch.save({"state_dict": sd}, p)
    src = open_training_checkpoint(p).source
    spans = {k: src.file_span(k) for k in sd}
    # contiguous tensors (views at an offset of a shared storage included) have one; strided ones do not
    assert {k for k, s in spans.items() if s is None} == {"strided", "t", "big_t", "block", "empty"}
    for k, span in spans.items():
        if span is not None:
            fd, offset, nbytes = span
            t = sd[k].contiguous()
            assert nbytes == t.numel() * t.element_size()
            assert os.pread(fd, nbytes, offset) == t.view(torch.uint8).numpy().tobytes() if t.dim() else True, k
    save_file({"a": torch.randn(3, 5), "b": torch.arange(7)}, tmp_path / "m.safetensors")
    st = SafetensorsSource("s", tmp_path, {"a": tmp_path / "m.safetensors", "b": tmp_path / "m.safetensors"}, "s")
    for k in ("a", "b"):
        fd, offset, nbytes = st.file_span(k)
        assert os.pread(fd, nbytes, offset) == st.load(k).view(torch.uint8).numpy().tobytes()
    assert sources.RenamedSource(st, {"a": "x", "b": "y"}).file_span("x") == st.file_span("a")
    mem = sources.StateDictSource("m", tmp_path, {"a": torch.ones(3, 5)}, "m")
    assert mem.file_span("a") is None
    # a chained fine-tune's overlay: each key's span is the one of the source it is read from
    from maskport.convert.overlay import overlay

    merged, _, problems = overlay(st, mem, "pretrained_pth")
    assert not problems
    assert merged.file_span("a") is None and merged.file_span("b") == st.file_span("b")


@pytest.mark.parametrize("checksums", [False, True])
def test_renamed_tensors_are_copied_file_to_file_byte_identical(tmp_path, monkeypatch, checksums):
    import hashlib

    plan, _, _ = _file_plan(tmp_path, torch.bfloat16)
    kinds = {ps.step.targets[0]: writer._step_buffer_plan(ps, plan)[2] for ps in plan.steps}
    # same-dtype renamings out of a file are copied; the fp32 (cast) and non-contiguous tensor is not
    assert kinds == {"lin.weight": "lora", "extra": "identity", "norm.weight": "passthrough",
                     "big.weight": "passthrough"}
    shards, got = _write(plan, tmp_path / "fast", checksums=checksums)
    # the same plan through pooled buffers (no file-to-file copies)
    monkeypatch.setattr(writer, "_file_span", lambda ps, plan: None)
    assert {writer._step_buffer_plan(ps, plan)[2] for ps in plan.steps} == {"lora", "identity"}
    shards2, ref = _write(plan, tmp_path / "pooled", checksums=checksums)
    assert got == ref
    if checksums:
        assert shards[0].sha256 == shards2[0].sha256 == hashlib.sha256(got).hexdigest()
    else:
        assert shards[0].sha256 is None


@pytest.mark.parametrize("how", ["unsupported", "missing"])
@pytest.mark.parametrize("checksums", [False, True])
def test_file_to_file_copy_falls_back_when_the_kernel_cannot(tmp_path, monkeypatch, how, checksums):
    import errno
    import hashlib
    import os

    plan, _, _ = _file_plan(tmp_path, torch.bfloat16)
    _, ref = _write(plan, tmp_path / "ref")
    calls = []
    if how == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        def cross_device(*a, **k):
            calls.append(a)
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", cross_device)
    shards, got = _write(plan, tmp_path / "out", checksums=checksums)
    assert got == ref
    if checksums:
        assert shards[0].sha256 == hashlib.sha256(ref).hexdigest()
    if how == "unsupported" and not checksums:
        assert len(calls) == 1  # tried once, then the fallback for the rest of the conversion


def test_file_to_file_copy_of_a_truncated_input_fails(tmp_path):
    import os

    plan, _, _ = _file_plan(tmp_path, torch.bfloat16)
    f = tmp_path / "base" / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)  # after planning: the last tensor's bytes are cut short
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnreadableFile, match="truncated"):
        writer.write_shards(plan, out, max_shard_size=10**9)
    assert not [t for t in threading.enumerate() if t.name.startswith("maskport-")]


def test_shard_sha256_is_of_the_file_as_written_across_hash_windows(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(writer, "_HASH_WINDOW", 100_000)  # windows that start at unaligned offsets
    plan, _, _ = _file_plan(tmp_path, torch.bfloat16)
    out = tmp_path / "out"
    out.mkdir()
    shards = writer.write_shards(plan, out, max_shard_size=1_500_000, checksums=True)
    assert len(shards) >= 2
    for s in shards:
        assert s.sha256 == hashlib.sha256((out / s.filename).read_bytes()).hexdigest(), s.filename
    assert not [t for t in threading.enumerate() if t.name.startswith("maskport-")]


def test_hasher_errors_surface_and_nothing_hangs(tmp_path, monkeypatch):
    plan, _, _ = _file_plan(tmp_path, torch.bfloat16)
    out = tmp_path / "out"
    out.mkdir()

    def broken(fd, offset, nbytes, h):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer, "_hash_range", broken)
    t0 = time.time()
    with pytest.raises(OSError, match="Input/output"):
        writer.write_shards(plan, out, max_shard_size=10**9, checksums=True)
    assert time.time() - t0 < 30
    assert not [t for t in threading.enumerate() if t.name.startswith("maskport-")]
