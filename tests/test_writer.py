"""The streaming writer produces standard safetensors (read back by the safetensors library)."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from maskport.convert.plan import build_plan
from maskport.convert.rules import CopyRest, LoraMerge
from maskport.convert.sources import StateDictSource, open_hf_folder
from maskport.convert.writer import parse_size, write_shards


def make_plan(dtype=torch.bfloat16):
    torch.manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 32) for i in range(6)}
    tensors.update({"scalar": torch.tensor(3.0), "ids": torch.arange(5), "empty": torch.zeros(0, 4),
                    "flag": torch.tensor([True, False])})
    lora = {"A": torch.randn(4, 32), "B": torch.randn(64, 4)}
    srcs = {"base": StateDictSource("base", "/b", tensors, "b"), "ck": StateDictSource("ck", "/c", lora, "c")}

    rules = [LoraMerge(target="layer0.weight", base="base:layer0.weight", a="ck:A", b="ck:B", scaling=0.5),
             CopyRest(target="{rest}", source="base:{rest}")]
    return build_plan(rules, srcs, out_dtype=dtype), tensors, lora


def test_single_shard_round_trip(tmp_path):
    plan, tensors, lora = make_plan()
    shards = write_shards(plan, tmp_path, max_shard_size=10**9)
    assert [s.filename for s in shards] == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        if k == "layer0.weight":
            continue
        exp = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert loaded[k].dtype == exp.dtype and torch.equal(loaded[k], exp), k
    merged = (tensors["layer0.weight"] + 0.5 * lora["B"] @ lora["A"]).to(torch.bfloat16)
    assert torch.equal(loaded["layer0.weight"], merged)


def test_sharding_index_and_sha256(tmp_path):
    plan, tensors, _ = make_plan(torch.float32)
    shards = write_shards(plan, tmp_path, max_shard_size=64 * 32 * 4 * 2, checksums=True)  # two weights per shard
    assert len(shards) >= 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == plan.total_bytes()
    for s in shards:
        assert hashlib.sha256((tmp_path / s.filename).read_bytes()).hexdigest() == s.sha256
        with safe_open(str(tmp_path / s.filename), "pt") as f:
            assert f.metadata()["format"] == "pt"
    # our own reader opens the sharded folder too
    src = open_hf_folder(tmp_path)
    assert torch.equal(src.load("layer3.weight"), tensors["layer3.weight"])


def test_computed_shape_differing_from_plan_is_caught(tmp_path):
    from maskport.errors import ShapeMismatch

    plan, _, _ = make_plan()
    plan.steps[1].output_infos[0] = type(plan.steps[1].output_infos[0])((1, 2), torch.bfloat16)
    with pytest.raises(ShapeMismatch):
        write_shards(plan, tmp_path, max_shard_size=10**9)


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("500MiB", 500 << 20), ("1.5GB", 1_500_000_000),
                                           ("1024", 1024), (77, 77)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "-1GB", "lots", "0", "1.5G"])  # 2G: decimal or binary? refused
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_checksums_are_optional_and_do_not_change_the_bytes(tmp_path):
    plan, _, _ = make_plan(torch.float32)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_shards(plan, tmp_path / "a", max_shard_size=1 << 20)
    b = write_shards(plan, tmp_path / "b", max_shard_size=1 << 20, checksums=True)
    assert all(s.sha256 is None for s in a)
    for sa, sb in zip(a, b):
        data = (tmp_path / "a" / sa.filename).read_bytes()
        assert data == (tmp_path / "b" / sb.filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sb.sha256


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype, monkeypatch):
    """The writer's finiteness check (chunk minimum/maximum) against ``torch.isfinite``, for one NaN, +inf or -inf
    at every position of the vector lanes, at both ends, across a chunk boundary, and for tensors without any."""
    from maskport.convert import writer

    monkeypatch.setattr(writer, "_FINITE_CHUNK", 1000)  # several chunks, a short last one
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3001, generator=g).to(dtype)
    assert writer.all_finite(base) and writer.all_finite(base[:3000].reshape(1000, 3)[:, 1])  # strided
    assert writer.all_finite(torch.empty(0, dtype=dtype))
    big = torch.full((5,), torch.finfo(dtype).max, dtype=dtype)  # the largest finite values are finite
    assert writer.all_finite(big) and writer.all_finite(-big)
    positions = [*range(70), 999, 1000, 1001, 1500, 2999, 3000]
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in positions:
            t = base.clone()
            t[pos] = bad
            assert bool(torch.isfinite(t).all()) is False
            assert writer.all_finite(t) is False, (bad, pos)
            assert writer.all_finite(t.reshape(3001, 1)) is False, (bad, pos)
    t = base.clone()
    t[5], t[2000] = float("inf"), float("-inf")  # both ends of the range: neither hides the other
    assert writer.all_finite(t) is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_merge_overflowing_the_output_dtype_is_refused(tmp_path, dtype):
    """Finite inputs whose LoRA merge leaves the output dtype's range (checked block by block during the merge):
    NonFiniteOutput naming the tensor, as for any other step."""
    from maskport.errors import NonFiniteOutput

    w = torch.full((64, 32), 1.0, dtype=dtype)
    lora = {"A": torch.ones(4, 32, dtype=dtype), "B": torch.ones(64, 4, dtype=dtype)}
    srcs = {"base": StateDictSource("base", "/b", {"layer0.weight": w}, "b"),
            "ck": StateDictSource("ck", "/c", lora, "c")}
    scaling = float(torch.finfo(dtype).max) / 2  # 4 * max / 2 = 2 * max: inf after the cast (finite in float32)
    plan = build_plan([LoraMerge(target="layer0.weight", base="base:layer0.weight", a="ck:A", b="ck:B",
                                 scaling=scaling)], srcs, out_dtype=dtype)
    with pytest.raises(NonFiniteOutput, match="layer0.weight"):
        write_shards(plan, tmp_path, max_shard_size=10**9)


def test_merge_threads_do_not_change_the_shards(tmp_path, monkeypatch):
    """write_shards with its merges shared out between 3 threads writes the same bytes as with one."""
    from maskport.convert import ops, writer

    monkeypatch.setattr(ops, "MERGE_BLOCK_BYTES", 4 * 32 * 5)  # 13 blocks of 5 rows for the 64-row merge
    digests = []
    for workers in (1, 3):
        monkeypatch.setattr(writer, "MERGE_WORKERS", workers)
        plan, _, _ = make_plan()
        out = tmp_path / str(workers)
        out.mkdir()
        write_shards(plan, out, max_shard_size=10**9)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
