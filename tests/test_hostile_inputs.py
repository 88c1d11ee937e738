"""A corpus of malformed and hostile inputs across ``convert``, ``verify`` and ``quantize`` (issue 20).

Every case runs the real console entry point (``maskport.cli_errors.entry``) in a child forked from one pre-imported
runner (``tests/_forkrunner.py``; two at a time), under an address-space limit, a wall-clock alarm and (for the
full-disk case) a file-size limit. Each case must end with:

- exit code 2 (not 1, not a signal: a native thread aborting the process at exit shows up here as -6);
- exactly one ``error:`` line on stderr and no traceback;
- no output folder, and no debris (no temporary folder, no lock file) anywhere beside it;
- every input byte-identical afterwards (the case's own files and the shared fixture, listed and hashed);
- bounded time (the alarm) and peak RSS (at most the runner's + ``RSS_MARGIN``).

Longer variants (a real 1M-tensor header, a decompression bomb that would decode to 6 GB) carry the ``slow`` marker.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
RSS_MARGIN_KIB = 1_200_000        # a case may grow the runner's RSS by at most ~1.2 GB
MEM_LIMIT = 3 << 30               # address space a child may add to the runner's
TIMEOUT_S = 60                    # per case (the slowest default case takes a few seconds)


@dataclass
class Case:
    id: str
    build: Callable  # (ctx, case_dir) -> argv (list) or (argv, extra: dict)
    needles: tuple = ()
    slow: bool = False


CASES: list[Case] = []


def case(id: str, *needles: str, slow: bool = False):
    def deco(fn):
        CASES.append(Case(id, fn, tuple(needles), slow))
        return fn
    return deco


# ------------------------------------------------------------------------------------------------ helpers


def st_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write(p: Path, data: bytes | str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def copy_base(ctx, d: Path) -> Path:
    b = d / "base"
    shutil.copytree(ctx.fx.base_dir, b)
    return b


def conv(ctx, d: Path, *, ckpt=None, base=None, sam2=None, out=None, extra=()) -> list:
    argv = ["convert", "mmengine-to-hf", str(ckpt or ctx.fx.ckpt), "--base", str(base or ctx.fx.base_dir),
            "--sam2", str(sam2 or ctx.fx.sam2_pt), "-o", str(out or d / "out"), "--no-progress"]
    return argv + [str(x) for x in extra]


def ckpt_with_cfg(ctx, d: Path, cfg_text: str) -> Path:
    obj = dict(ctx.ckpt_obj)
    obj["meta"] = {**obj["meta"], "cfg": cfg_text}
    p = d / "iter_2.pth"
    import torch

    torch.save(obj, p)
    return p


def quant(ctx, d: Path, *, export=None, out=None, extra=()) -> list:
    return ["quantize", str(export or ctx.export), "-o", str(out or d / "out"), "--calib-text-only",
            "--device", "cpu"] + [str(x) for x in extra]


def verify_args(ctx, d: Path, samples, *, extra=()) -> list:
    return ["verify", str(ctx.export), str(ctx.export), "--samples", str(samples), "--device", "cpu",
            "--no-progress", "--report", str(d / "out")] + [str(x) for x in extra]


def samples_file(ctx, d: Path, rows: list | str) -> Path:
    img = d / "img.png"
    shutil.copy(ctx.image, img)
    text = rows if isinstance(rows, str) else "\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows)
    return write(d / "samples.jsonl", text + "\n")


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h, with one tiny IDAT (the size is all a reader sees before decoding)."""
    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def png_bomb(w: int, h: int) -> bytes:
    """A valid grayscale PNG of w x h zeros: a few hundred KB that decode to w*h bytes."""
    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)
    comp = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    parts = [comp.compress(row * 256) for _ in range(h // 256)]
    parts.append(comp.compress(row * (h % 256)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


# ------------------------------------------------------------------------------------------------ convert: base folder


def _base_cfg(content):
    def build(ctx, d):
        b = copy_base(ctx, d)
        write(b / "config.json", content if isinstance(content, (bytes, str)) else json.dumps(content))
        return conv(ctx, d, base=b)
    return build


case("base-config-list", "config.json", "JSON array")(_base_cfg([1, 2, 3]))
case("base-config-string", "config.json", "string")(_base_cfg('"qwen2_5_vl"'))
case("base-config-number", "config.json")(_base_cfg("42"))
case("base-config-model-type-list", "qwen2_5_vl")(_base_cfg({"model_type": ["qwen2_5_vl"]}))
case("base-config-duplicate-keys", "duplicate key 'model_type'")(
    _base_cfg('{"model_type": "qwen2_5_vl", "model_type": "llava"}'))
case("base-config-deep-nesting", "nested deeper")(_base_cfg("[" * 100_000 + "]" * 100_000))
case("base-config-nan-literal", "NaN is not JSON")(_base_cfg('{"model_type": "qwen2_5_vl", "x": NaN}'))
case("base-config-binary", "config.json")(_base_cfg(b"\xff\xfe\x00\x01garbage"))
case("base-config-empty", "config.json")(_base_cfg(b""))
case("base-config-truncated", "config.json")(_base_cfg('{"model_type": "qwen2_5_vl", "text_config": {'))


@case("base-config-huge-sparse", "bytes, more than")
def _(ctx, d):
    b = copy_base(ctx, d)
    with open(b / "config.json", "wb") as f:
        f.truncate(200 << 20)  # sparse: 200 MB that cost no disk
    return conv(ctx, d, base=b)


@case("base-config-is-folder", "config.json")
def _(ctx, d):
    b = copy_base(ctx, d)
    (b / "config.json").unlink()
    (b / "config.json").mkdir()
    return conv(ctx, d, base=b)


@case("base-config-symlink-loop", "config.json")
def _(ctx, d):
    b = copy_base(ctx, d)
    (b / "config.json").unlink()
    os.symlink("config.json", b / "config.json")
    return conv(ctx, d, base=b)


@case("base-config-missing", "config.json")
def _(ctx, d):
    b = copy_base(ctx, d)
    (b / "config.json").unlink()
    return conv(ctx, d, base=b)


@case("base-config-missing-text-config", "structure")
def _(ctx, d):
    b = copy_base(ctx, d)
    cfg = json.loads((b / "config.json").read_text())
    cfg.pop("text_config", None)
    cfg.pop("vision_config", None)
    cfg["text_config"] = [1, 2]
    write(b / "config.json", json.dumps(cfg))
    return conv(ctx, d, base=b)


def _base_st(header, data=b"", raw=None):
    def build(ctx, d):
        b = copy_base(ctx, d)
        write(b / "model.safetensors", raw if raw is not None else st_bytes(header, data))
        return conv(ctx, d, base=b)
    return build


case("st-dtype-list", "unsupported dtype")(_base_st({"w": {**GOOD_ENTRY, "dtype": ["F32"]}}, b"\0" * 8))
case("st-dtype-unknown", "unsupported dtype")(_base_st({"w": {**GOOD_ENTRY, "dtype": "C64"}}, b"\0" * 8))
case("st-header-list", "not a JSON object")(_base_st([1, 2], b""))
case("st-shape-negative", "bad shape")(_base_st({"w": {**GOOD_ENTRY, "shape": [-2]}}, b"\0" * 8))
case("st-shape-float", "bad shape")(_base_st({"w": {**GOOD_ENTRY, "shape": [2.0]}}, b"\0" * 8))
case("st-offsets-string", "data_offsets")(_base_st({"w": {**GOOD_ENTRY, "data_offsets": "0,8"}}, b"\0" * 8))
case("st-overlapping-spans", "overlaps")(_base_st(
    {"a": GOOD_ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12))
case("st-identical-spans", "overlaps")(_base_st({"a": GOOD_ENTRY, "b": GOOD_ENTRY}, b"\0" * 8))
case("st-gap-between-spans", "gap")(_base_st(
    {"a": GOOD_ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, b"\0" * 24))
case("st-data-past-end", "past the end")(_base_st({"w": GOOD_ENTRY}, b"\0" * 4))
case("st-header-length-huge", "does not fit")(_base_st(None, raw=struct.pack("<Q", 1 << 60) + b"{}"))
case("st-shorter-than-8-bytes", "8-byte")(_base_st(None, raw=b"\x01\x02\x03"))
case("st-header-nested-arrays", "nested deeper")(_base_st(None, raw=st_bytes(
    ("[" * 100_000 + "]" * 100_000).encode())))
case("st-duplicate-tensor-names", "duplicate key")(_base_st(None, raw=st_bytes(
    b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
    b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8)))
case("st-metadata-not-strings", "__metadata__")(_base_st({"__metadata__": {"a": 1}, "w": GOOD_ENTRY}, b"\0" * 8))
case("st-entry-extra-field", "malformed entry")(_base_st({"w": {**GOOD_ENTRY, "code": "x"}}, b"\0" * 8))
case("st-not-json", "not JSON")(_base_st(None, raw=st_bytes(b"\x80\x81 not json", b"")))


@case("st-many-zero-size-tensors", "problem")
def _(ctx, d):
    """100k valid (empty) tensors: read, planned and refused (not in the target model) in bounded time."""
    b = copy_base(ctx, d)
    header = {f"extra.t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(100_000)}
    from safetensors.torch import load_file  # noqa: F401  (the real base's tensors are kept below)
    from maskport.io.safetensors import read_safetensors_header

    entries, _ = read_safetensors_header(b / "model.safetensors")
    raw = (b / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    real = json.loads(raw[8:8 + n])
    real.pop("__metadata__", None)
    write(b / "model.safetensors", st_bytes({**real, **header}, raw[8 + n:]))
    return conv(ctx, d, base=b, extra=["--dry-run"])


@case("st-million-tensors", "more than", slow=True)
def _(ctx, d):
    b = copy_base(ctx, d)
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(1_000_001)}
    write(b / "model.safetensors", st_bytes(header))
    return conv(ctx, d, base=b)


def _sharded_base(ctx, d, weight_map, files=("model-00001-of-00001.safetensors",), raw_index=None):
    b = copy_base(ctx, d)
    st = b / "model.safetensors"
    for f in files:
        shutil.copy(st, b / f)
    st.unlink()
    write(b / "model.safetensors.index.json", raw_index if raw_index is not None else json.dumps(weight_map))
    return b


def _index(content=None, raw=None, files=("model-00001-of-00001.safetensors",)):
    def build(ctx, d):
        return conv(ctx, d, base=_sharded_base(ctx, d, content, files, raw))
    return build


case("index-is-list", "JSON array")(_index([1, 2]))
case("index-no-weight-map", "weight_map")(_index({"metadata": {}}))
case("index-weight-map-list", "weight_map")(_index({"weight_map": ["a"]}))
case("index-value-number", "weight_map")(_index({"weight_map": {"model.embed_tokens.weight": 3}}))
case("index-zip-slip-dotdot", "not a plain file name")(_index({"weight_map": {"w": "../base/model.safetensors"}}))
case("index-absolute-path", "not a plain file name")(_index({"weight_map": {"w": "/etc/passwd"}}))
case("index-missing-shard", "missing")(_index({"weight_map": {"w": "model-00009-of-00009.safetensors"}}))
case("index-duplicate-keys", "duplicate key")(_index(raw='{"weight_map": {}, "weight_map": {}}'))
case("index-deep", "nested deeper")(_index(raw='{"weight_map": ' + "[" * 5000 + "]" * 5000 + "}"))


@case("index-shard-symlink-outside", "outside")
def _(ctx, d):
    outside = d / "elsewhere" / "shard.safetensors"
    outside.parent.mkdir()
    shutil.copy(ctx.fx.base_dir / "model.safetensors", outside)
    b = _sharded_base(ctx, d, {"weight_map": {"w": "model-00001-of-00001.safetensors"}}, files=())
    os.symlink(outside, b / "model-00001-of-00001.safetensors")
    return conv(ctx, d, base=b)


@case("base-weights-symlink-to-dev-zero", "model.safetensors")
def _(ctx, d):
    b = copy_base(ctx, d)
    (b / "model.safetensors").unlink()
    os.symlink("/dev/zero", b / "model.safetensors")
    return conv(ctx, d, base=b)


@case("base-tokenizer-config-list", "tokenizer")
def _(ctx, d):
    b = copy_base(ctx, d)
    write(b / "tokenizer_config.json", "[1, 2]")
    return conv(ctx, d, base=b)


# ------------------------------------------------------------------------------------------------ convert: checkpoint


def _ckpt_bytes(data: bytes, name="iter_2.pth"):
    def build(ctx, d):
        return conv(ctx, d, ckpt=write(d / name, data))
    return build


case("ckpt-text-file", "iter_2.pth")(_ckpt_bytes(b"model = dict(type='x')\n"))
case("ckpt-empty-file", "iter_2.pth")(_ckpt_bytes(b""))
case("ckpt-3-byte-pickle", "iter_2.pth")(_ckpt_bytes(b"\x80\x02a"))
case("ckpt-legacy-pickle-garbage", "iter_2.pth")(_ckpt_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01"))
case("ckpt-pickle-os-system", "iter_2.pth")(_ckpt_bytes(
    b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."))
case("ckpt-pickle-builtins-eval", "iter_2.pth")(_ckpt_bytes(
    b"\x80\x02cbuiltins\neval\nq\x00X\x01\x00\x00\x001q\x01\x85q\x02Rq\x03."))
case("ckpt-unicode-name-missing", "does not exist")(
    lambda ctx, d: conv(ctx, d, ckpt=d / "чекпоинт-🐍-ｉｔｅｒ.pth"))


@case("ckpt-truncated-zip", "iter_2.pth")
def _(ctx, d):
    raw = ctx.fx.ckpt.read_bytes()
    return conv(ctx, d, ckpt=write(d / "iter_2.pth", raw[: len(raw) // 2]))


@case("ckpt-zip-slip-entry", "iter_2.pth")
def _(ctx, d):
    p = d / "iter_2.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}}, protocol=2))
        z.writestr("archive/../../evil.txt", b"pwned")
        z.writestr("archive/version", b"3\n")
    return conv(ctx, d, ckpt=p)


@case("ckpt-torch-list", "iter_2.pth")
def _(ctx, d):
    import torch

    p = d / "iter_2.pth"
    torch.save([1, 2, 3], p)
    return conv(ctx, d, ckpt=p)


@case("ckpt-state-dict-string-values", "iter_2.pth")
def _(ctx, d):
    import torch

    p = d / "iter_2.pth"
    torch.save({"state_dict": {"mllm.model.x": "not a tensor"}, "meta": {}}, p)
    return conv(ctx, d, ckpt=p)


@case("ckpt-is-fifo", "iter_2.pth")
def _(ctx, d):
    p = d / "iter_2.pth"
    os.mkfifo(p)
    return conv(ctx, d, ckpt=p)


case("ckpt-dev-zero", "/dev/zero")(lambda ctx, d: conv(ctx, d, ckpt="/dev/zero"))


@case("ckpt-empty-folder", "ckpt")
def _(ctx, d):
    (d / "ckpt").mkdir()
    return conv(ctx, d, ckpt=d / "ckpt")


@case("deepspeed-latest-traversal", "latest")
def _(ctx, d):
    ds = d / "ds"
    ds.mkdir()
    write(ds / "latest", "../../../../etc")
    return conv(ctx, d, ckpt=ds)


@case("cfg-lora-alpha-1e999", "non-finite")
def _(ctx, d):
    text = ctx.cfg_text.replace("lora_alpha=16", "lora_alpha=1e999")
    assert text != ctx.cfg_text
    return conv(ctx, d, ckpt=ckpt_with_cfg(ctx, d, text))


@case("cfg-square-40-times", "integer of more than")
def _(ctx, d):
    return conv(ctx, d, ckpt=ckpt_with_cfg(ctx, d, "x = 3\n" + "x = x * x\n" * 40))


@case("cfg-100000-term-expression", "training config")
def _(ctx, d):
    return conv(ctx, d, ckpt=ckpt_with_cfg(ctx, d, "x = " + "+".join(["1"] * 100_000) + "\n"))


@case("cfg-names-reused-exponentially", "values")
def _(ctx, d):
    text = "a0 = [1, 2, 3]\n" + "".join(f"a{i} = [a{i - 1}, a{i - 1}]\n" for i in range(1, 60))
    return conv(ctx, d, ckpt=ckpt_with_cfg(ctx, d, text))


@case("cfg-string-doubling", "training config")
def _(ctx, d):
    return conv(ctx, d, ckpt=ckpt_with_cfg(ctx, d, "s = 'ab'\n" + "s = s + s\n" * 64))


@case("cfg-deep-value-chain", "training config")
def _(ctx, d):
    text = "a0 = [1]\n" + "".join(f"a{i} = [a{i - 1}]\n" for i in range(1, 250_000))
    return conv(ctx, d, ckpt=ckpt_with_cfg(ctx, d, text))


@case("cfg-huge-text", "characters")
def _(ctx, d):
    return conv(ctx, d, ckpt=ckpt_with_cfg(ctx, d, "# " + "x" * (5 << 20) + "\n"))


# ------------------------------------------------------------------------------------------------ convert: flags


case("lora-alpha-nan", "non-finite")(lambda ctx, d: conv(ctx, d, extra=["--lora-alpha", "nan"]))
case("lora-alpha-inf", "non-finite")(lambda ctx, d: conv(ctx, d, extra=["--lora-alpha", "inf"]))
case("lora-alpha-minus-inf", "non-finite")(lambda ctx, d: conv(ctx, d, extra=["--lora-alpha", "-inf"]))
case("lora-alpha-overflows-fp16", "NaN/inf")(
    lambda ctx, d: conv(ctx, d, extra=["--lora-alpha", "1e30", "--dtype", "fp16"]))
case("lora-alpha-overflows-fp32", "non-finite in float32")(
    lambda ctx, d: conv(ctx, d, extra=["--lora-alpha", "1e300"]))
case("lora-r-zero", "lora")(lambda ctx, d: conv(ctx, d, extra=["--lora-r", "0"]))
case("max-shard-size-infGB", "--max-shard-size")(lambda ctx, d: conv(ctx, d, extra=["--max-shard-size", "infGB"]))
case("max-shard-size-nan", "--max-shard-size")(lambda ctx, d: conv(ctx, d, extra=["--max-shard-size", "nanGB"]))
case("max-shard-size-negative", "--max-shard-size")(lambda ctx, d: conv(ctx, d, extra=["--max-shard-size", "-1GB"]))
case("max-shard-size-1e400", "--max-shard-size")(lambda ctx, d: conv(ctx, d, extra=["--max-shard-size", "1e400GB"]))
case("dtype-unknown", "--dtype")(lambda ctx, d: conv(ctx, d, extra=["--dtype", "int4"]))
case("family-unknown", "nope")(lambda ctx, d: conv(ctx, d, extra=["--family", "nope"]))
case("sam2-config-json-list", "--sam2-config")(
    lambda ctx, d: conv(ctx, d, extra=["--sam2-config", write(d / "sam2.json", "[1, 2]")]))
case("sam2-config-yaml-list", "--sam2-config")(
    lambda ctx, d: conv(ctx, d, extra=["--sam2-config", write(d / "sam2.yaml", "- 1\n- 2\n")]))
case("sam2-config-json-duplicate", "duplicate key")(
    lambda ctx, d: conv(ctx, d, extra=["--sam2-config", write(d / "sam2.json", '{"model": {}, "model": {}}')]))
case("sam2-text-file", "sam2.pt")(lambda ctx, d: conv(ctx, d, sam2=write(d / "sam2.pt", "not a checkpoint\n")))
case("sam2-3-byte-pickle", "sam2.pt")(lambda ctx, d: conv(ctx, d, sam2=write(d / "sam2.pt", b"\x80\x02a")))
case("sam2-safetensors-overlap", "overlaps")(lambda ctx, d: conv(ctx, d, sam2=write(
    d / "sam2.safetensors", st_bytes({"a": GOOD_ENTRY, "b": GOOD_ENTRY}, b"\0" * 8))))
case("sam2-missing", "does not exist")(lambda ctx, d: conv(ctx, d, sam2=d / "nope.pt"))


# ------------------------------------------------------------------------------------------------ convert: outputs


@case("out-is-base-overwrite", "is the input")
def _(ctx, d):
    b = copy_base(ctx, d)
    return conv(ctx, d, base=b, out=b, extra=["--overwrite"])


@case("out-inside-base", "is inside the input")
def _(ctx, d):
    b = copy_base(ctx, d)
    return conv(ctx, d, base=b, out=b / "export", extra=["--overwrite"])


@case("out-contains-ckpt", "contains the input")
def _(ctx, d):
    ck = d / "run" / "iter_2.pth"
    ck.parent.mkdir()
    shutil.copy(ctx.fx.ckpt, ck)
    return conv(ctx, d, ckpt=ck, out=d / "run", extra=["--overwrite"])


@case("out-is-ckpt-file", "is the input")
def _(ctx, d):
    ck = write(d / "iter_2.pth", ctx.fx.ckpt.read_bytes())
    return conv(ctx, d, ckpt=ck, out=ck, extra=["--overwrite"])


@case("out-is-sam2-file", "is the input")
def _(ctx, d):
    s = write(d / "sam2.pt", ctx.fx.sam2_pt.read_bytes())
    return conv(ctx, d, sam2=s, out=s, extra=["--overwrite"])


@case("out-symlink-to-base", "symbolic link")
def _(ctx, d):
    b = copy_base(ctx, d)
    os.symlink(b, d / "link")
    return conv(ctx, d, base=b, out=d / "link", extra=["--overwrite"])


@case("out-symlink-to-other-folder", "symbolic link")
def _(ctx, d):
    (d / "other").mkdir()
    write(d / "other" / "keep.txt", "user data")
    os.symlink(d / "other", d / "link")
    return conv(ctx, d, out=d / "link", extra=["--overwrite"])


@case("out-dotdot-into-base", "is the input")
def _(ctx, d):
    b = copy_base(ctx, d)
    (d / "x").mkdir()
    return conv(ctx, d, base=b, out=d / "x" / ".." / "base", extra=["--overwrite"])


@case("out-exists-no-overwrite", "already exists")
def _(ctx, d):
    write(d / "existing" / "keep.txt", "user data")
    return conv(ctx, d, out=d / "existing")


@case("out-parent-is-file", "out")
def _(ctx, d):
    write(d / "afile", "x")
    return conv(ctx, d, out=d / "afile" / "out")


case("out-read-only-filesystem", "/sys")(lambda ctx, d: conv(ctx, d, out="/sys/maskport-hostile-out"))
case("out-name-too-long", "too long")(lambda ctx, d: conv(ctx, d, out=d / ("é" * 200)))
case("out-path-too-long", "too long")(
    lambda ctx, d: conv(ctx, d, out=d / "/".join(["dir-" + "ü" * 60] * 40) / "out"))


@case("out-locked-by-another-writer", "another maskport process")
def _(ctx, d):
    lock = d / ".out.maskport-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"424242\n")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx.held_fds.append(fd)  # held by this test process while the case runs
    return conv(ctx, d)


@case("disk-full-while-writing", "out")
def _(ctx, d):
    return conv(ctx, d), {"fsize": 64 << 10}  # any file past 64 KiB fails (EFBIG), as a full disk would


# ------------------------------------------------------------------------------------------------ convert: released


def _released(cfg):
    def build(ctx, d):
        f = d / "released"
        f.mkdir()
        write(f / "config.json", cfg if isinstance(cfg, str) else json.dumps(cfg))
        shutil.copy(ctx.fx.base_dir / "model.safetensors", f / "model.safetensors")
        return ["convert", "sa2va-hf-to-native", str(f), "-o", str(d / "out"), "--no-progress"]
    return build


case("released-config-list", "config.json")(_released("[1]"))
case("released-config-no-vision-config", "structure")(_released(
    {"model_type": "sa2va_chat", "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}}))
case("released-config-llm-config-list", "structure")(_released({"model_type": "sa2va_chat", "llm_config": [1]}))
case("released-folder-missing", "does not exist")(
    lambda ctx, d: ["convert", "sa2va-hf-to-native", str(d / "nope"), "-o", str(d / "out")])


# ------------------------------------------------------------------------------------------------ quantize


def _export_copy(ctx, d) -> Path:
    e = d / "export"
    shutil.copytree(ctx.export, e)
    return e


def _q_cfg(content):
    def build(ctx, d):
        e = _export_copy(ctx, d)
        write(e / "config.json", content if isinstance(content, (bytes, str)) else json.dumps(content))
        return quant(ctx, d, export=e)
    return build


case("q-config-list", "config.json", "JSON array")(_q_cfg([1]))
case("q-config-model-type-list", "model_type")(_q_cfg({"model_type": ["x"]}))
case("q-config-duplicate-keys", "duplicate key")(_q_cfg('{"model_type": "a", "model_type": "b"}'))
case("q-config-deep", "nested deeper")(_q_cfg("{\"a\": " + "[" * 10000 + "]" * 10000 + "}"))
case("q-config-quantization-config-string", "quantization")(
    lambda ctx, d: _q_cfg({**json.loads((ctx.export / "config.json").read_text()),
                           "quantization_config": "gptq"})(ctx, d))
case("q-export-missing", "export")(lambda ctx, d: quant(ctx, d, export=d / "missing"))
case("q-out-is-export", "is the input")(lambda ctx, d: quant(ctx, d, out=ctx.export, extra=["--overwrite"]))
case("q-out-inside-export", "is inside the input")(
    lambda ctx, d: quant(ctx, d, out=ctx.export / "q", extra=["--overwrite"]))
case("q-save-mllm-is-export", "is the input")(
    lambda ctx, d: quant(ctx, d, extra=["--save-mllm", ctx.export, "--overwrite"]))
case("q-save-mllm-inside-export", "is inside the input")(
    lambda ctx, d: quant(ctx, d, extra=["--save-mllm", ctx.export / "mllm"]))
case("q-save-mllm-is-out", "is the input")(lambda ctx, d: quant(ctx, d, extra=["--save-mllm", d / "out"]))
case("q-max-shard-size-inf", "--max-shard-size")(lambda ctx, d: quant(ctx, d, extra=["--max-shard-size", "infGB"]))


@case("q-out-symlink", "symbolic link")
def _(ctx, d):
    (d / "other").mkdir()
    os.symlink(d / "other", d / "link")
    return quant(ctx, d, out=d / "link", extra=["--overwrite"])


@case("q-index-zip-slip", "not a plain file name")
def _(ctx, d):
    e = _export_copy(ctx, d)
    write(e / "model.safetensors.index.json", json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    return quant(ctx, d, export=e, extra=["--calib", samples_file(ctx, d, [{"image": "img.png", "prompt": "x"}])])


def _q_calib(rows):
    def build(ctx, d):
        s = samples_file(ctx, d, rows)
        argv = quant(ctx, d)
        argv.remove("--calib-text-only")
        return argv + ["--calib", str(s)]
    return build


case("q-calib-image-number", "'image'")(_q_calib([{"image": 3, "prompt": "<image>x"}]))
case("q-calib-prompt-list", "'prompt'")(_q_calib([{"image": "img.png", "prompt": ["x"]}]))
case("q-calib-deep", "nested deeper")(_q_calib(["[" * 1000 + "]" * 1000]))


# ------------------------------------------------------------------------------------------------ verify


def _v(rows, *extra):
    def build(ctx, d):
        return verify_args(ctx, d, samples_file(ctx, d, rows), extra=extra)
    return build


case("v-image-number", "'image'")(_v([{"image": 3, "prompt": "<image>x"}]))
case("v-image-null", "'image'")(_v([{"image": None, "prompt": "<image>x"}]))
case("v-prompt-dict", "'prompt'")(_v([{"image": "img.png", "prompt": {"a": 1}}]))
case("v-gt-mask-number", "'gt_mask'")(_v([{"image": "img.png", "prompt": "<image>x", "gt_mask": 7}]))
case("v-id-list", "'id'")(_v([{"image": "img.png", "prompt": "<image>x", "id": [1]}]))
case("v-row-is-list", "'image' and 'prompt'")(_v([[1, 2]]))
case("v-duplicate-keys", "duplicate key")(_v(['{"image": "img.png", "image": "other.png", "prompt": "x"}']))
case("v-deep-line", "nested deeper")(_v(["[" * 100_000 + "]" * 100_000]))
case("v-nan-literal", "NaN")(_v(['{"image": "img.png", "prompt": "x", "id": NaN}']))
case("v-image-missing", "does not exist")(_v([{"image": "nope.png", "prompt": "<image>x"}]))
case("v-image-dotdot-passwd", "not a readable image")(_v([{"image": "../" * 30 + "etc/passwd", "prompt": "x"}]))
case("v-image-dev-zero", "regular file")(_v([{"image": "/dev/zero", "prompt": "x"}]))
case("v-image-empty-name", "'image'")(_v([{"image": "", "prompt": "x"}]))
case("v-image-unicode-missing", "does not exist")(_v([{"image": "изображение-🖼-" + "ж" * 50 + ".png",
                                                       "prompt": "x"}]))
case("v-samples-garbage-text", "not JSON")(_v(b"\xff\xfe\xfa".decode("latin-1")))
case("v-max-image-pixels-small", "above the limit")(
    _v([{"image": "img.png", "prompt": "<image>x"}], "--max-image-pixels", "10"))
case("v-generation-kwargs-deep", "--generation-kwargs")(
    _v([{"image": "img.png", "prompt": "<image>x"}], "--generation-kwargs", "[" * 5000 + "]" * 5000))


@case("v-samples-not-utf8-bytes", "UTF-8")
def _(ctx, d):
    s = write(d / "samples.jsonl", b'{"image": "img.png", "prompt": "\xff\xfe"}\n')
    return verify_args(ctx, d, s)


@case("v-png-header-13000x13000", "above the limit")
def _(ctx, d):
    write(d / "big.png", png_header_only(13000, 13000))
    return verify_args(ctx, d, write(d / "s.jsonl", json.dumps({"image": "big.png", "prompt": "<image>x"}) + "\n"))


@case("v-png-header-20000x20000", "above the limit")
def _(ctx, d):
    write(d / "big.png", png_header_only(20000, 20000))
    return verify_args(ctx, d, write(d / "s.jsonl", json.dumps({"image": "big.png", "prompt": "<image>x"}) + "\n"))


@case("v-png-bomb-13000x13000", "above the limit", slow=True)
def _(ctx, d):
    write(d / "bomb.png", png_bomb(13000, 13000))
    return verify_args(ctx, d, write(d / "s.jsonl", json.dumps({"image": "bomb.png", "prompt": "<image>x"}) + "\n"))


@case("v-png-bomb-limit-raised", "cannot be decoded", slow=True)
def _(ctx, d):
    """With the limit raised the bomb is decoded, under the runner's memory limit: a one-line error, not a kill."""
    write(d / "bomb.png", png_bomb(30000, 30000))
    return verify_args(ctx, d, write(d / "s.jsonl", json.dumps({"image": "bomb.png", "prompt": "<image>x"}) + "\n"),
                       extra=["--max-image-pixels", str(10 ** 10)])


@case("v-gt-mask-header-huge", "above the limit")
def _(ctx, d):
    write(d / "gt.png", png_header_only(15000, 15000))
    return _v([{"image": "img.png", "prompt": "<image>x", "gt_mask": "gt.png"}])(ctx, d)


@case("v-image-text-named-png", "not a readable image")
def _(ctx, d):
    write(d / "fake.png", "hello")
    return verify_args(ctx, d, write(d / "s.jsonl", json.dumps({"image": "fake.png", "prompt": "x"}) + "\n"))


@case("v-samples-huge-sparse", "bytes, more than")
def _(ctx, d):
    with open(d / "s.jsonl", "wb") as f:
        f.truncate(300 << 20)
    return verify_args(ctx, d, d / "s.jsonl")


@case("v-report-is-ref", "is the input")
def _(ctx, d):
    s = samples_file(ctx, d, [{"image": "img.png", "prompt": "<image>x"}])
    argv = verify_args(ctx, d, s)
    argv[argv.index("--report") + 1] = str(ctx.export)
    return argv


@case("v-report-is-samples-folder", "is the input")
def _(ctx, d):
    shutil.copy(ctx.image, d / "a.png")
    return ["verify", str(ctx.export), str(ctx.export), "--samples", str(d), "--prompt", "x", "--device", "cpu",
            "--no-progress", "--report", str(d)]


def _coco(ctx, d, refs, instances):
    shutil.copy(ctx.image, d / "img.png")
    r = write(d / "refs.json", refs if isinstance(refs, (str, bytes)) else json.dumps(refs))
    i = write(d / "instances.json", instances if isinstance(instances, (str, bytes)) else json.dumps(instances))
    return ["verify", str(ctx.export), str(ctx.export), "--refcoco", str(r), "--instances", str(i),
            "--image-root", str(d), "--device", "cpu", "--no-progress"]


case("coco-instances-list", "instances")(lambda ctx, d: _coco(ctx, d, [], [1, 2]))
case("coco-instances-duplicate", "duplicate key")(
    lambda ctx, d: _coco(ctx, d, [], '{"images": [], "images": [], "annotations": []}'))
case("coco-image-file-name-number", "instances")(lambda ctx, d: _coco(
    ctx, d, [], {"images": [{"id": 1, "file_name": 5, "height": 4, "width": 4}], "annotations": []}))
case("coco-image-huge-size", "instances")(lambda ctx, d: _coco(
    ctx, d, [], {"images": [{"id": 1, "file_name": "img.png", "height": 10 ** 9, "width": 10 ** 9}],
                 "annotations": []}))
case("coco-refs-pickle-global", "refs")(lambda ctx, d: _coco_pickle(
    ctx, d, b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."))
case("coco-refs-3-byte-pickle", "refs")(lambda ctx, d: _coco_pickle(ctx, d, b"\x80\x02a"))


def _coco_pickle(ctx, d, data: bytes):
    argv = _coco(ctx, d, [], {"images": [], "annotations": []})
    p = write(d / "refs(unc).p", data)
    argv[argv.index("--refcoco") + 1] = str(p)
    return argv


@case("coco-refs-wrong-types", "refs")
def _(ctx, d):
    return _coco(ctx, d, [{"image_id": "x", "ann_id": {}, "split": "val", "sentences": 5}],
                 {"images": [{"id": 1, "file_name": "img.png", "height": 4, "width": 4}], "annotations": []})


# ------------------------------------------------------------------------------------------- hf-to-mmengine, serve


def _back(ctx, d, export, out=None) -> list:
    return ["convert", "hf-to-mmengine", str(export), "-o", str(out or d / "out"), "--no-progress"]


def _back_cfg(content):
    def build(ctx, d):
        e = _export_copy(ctx, d)
        write(e / "config.json", content if isinstance(content, (bytes, str)) else json.dumps(content))
        return _back(ctx, d, e)
    return build


case("back-config-list", "config.json", "JSON array")(_back_cfg([1]))
case("back-config-duplicate-keys", "duplicate key")(_back_cfg('{"model_type": "a", "model_type": "b"}'))
case("back-config-deep", "nested deeper")(_back_cfg("{\"a\": " + "[" * 10000 + "]" * 10000 + "}"))
case("back-out-inside-export", "is inside the input")(
    lambda ctx, d: _back(ctx, d, ctx.export, out=ctx.export / "model.safetensors") + ["--overwrite"])


def _serve_cfg(content):
    def build(ctx, d):
        e = _export_copy(ctx, d)
        write(e / "config.json", content if isinstance(content, (bytes, str)) else json.dumps(content))
        return ["serve", str(e), "--port", "0"]
    return build


case("serve-config-list", "config.json", "JSON array")(_serve_cfg([1]))
case("serve-config-duplicate-keys", "duplicate key")(_serve_cfg('{"model_type": "a", "model_type": "b"}'))


@case("serve-export-code-added", "--trust-export-code")
def _(ctx, d):
    e = _export_copy(ctx, d)
    write(e / "extra.py", "raise SystemExit('ran')\n")
    return ["serve", str(e), "--port", "0"]

# ------------------------------------------------------------------------------------------------ running


def _snapshot(paths) -> dict[str, str]:
    """path -> sha256 (files), 'dir', or 'link:target', for every entry under ``paths`` (links not followed)."""
    out = {}
    for root in paths:
        root = Path(root)
        if not (root.exists() or root.is_symlink()):
            continue
        stack = [root]
        while stack:
            p = stack.pop()
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "dir"
                stack.extend(p.iterdir())
            elif p.is_file():
                if p.stat().st_size > (64 << 20):  # sparse giants: size + first bytes
                    with open(p, "rb") as f:
                        out[str(p)] = f"big:{p.stat().st_size}:{hashlib.sha256(f.read(1 << 20)).hexdigest()}"
                else:
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "special"
    return out


class _Ctx:
    pass


@pytest.fixture(scope="session")
def hostile(request, fx, export_bf16, tmp_path_factory):
    """Build the selected cases, run them through the fork runner (2 at a time), return their outcomes."""
    import torch
    from PIL import Image

    selected = {item.callspec.params["hcase"].id for item in request.session.items
                if getattr(item, "callspec", None) is not None and "hcase" in item.callspec.params}
    root = tmp_path_factory.mktemp("hostile")
    ctx = _Ctx()
    ctx.fx, ctx.export, ctx.held_fds = fx, Path(export_bf16.out_dir), []
    ctx.ckpt_obj = torch.load(fx.ckpt, map_location="cpu", weights_only=False)
    ctx.cfg_text = ctx.ckpt_obj["meta"]["cfg"]
    ctx.image = root / "image.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(ctx.image)
    shared = [Path(fx.ckpt).parent.parent, ctx.export]
    shared_before = _snapshot(shared)
    built, runs = {}, []
    for c in CASES:
        if c.id not in selected:
            continue
        d = root / c.id
        d.mkdir()
        res = c.build(ctx, d)
        argv, extra = (res if isinstance(res, tuple) else (res, {}))
        built[c.id] = {"dir": d, "argv": argv, "before": _snapshot([d]),
                       "listing": sorted(os.listdir(d))}
        runs.append({"id": c.id, "argv": [str(a) for a in argv], "cwd": str(d),
                     "stdout": str(root / f"{c.id}.stdout"), "stderr": str(root / f"{c.id}.stderr"),
                     "timeout": TIMEOUT_S * (4 if c.slow else 1), "mem_bytes": MEM_LIMIT, **extra})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_forkrunner.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        ready = json.loads(proc.stdout.readline())
        proc.stdin.write(json.dumps({"jobs": 2, "cases": runs}) + "\n")
        proc.stdin.flush()
        results = {r["id"]: r for r in json.loads(proc.stdout.readline())["results"]}
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        for fd in ctx.held_fds:
            os.close(fd)
    for cid, r in results.items():
        r["stdout"] = (root / f"{cid}.stdout").read_text(errors="replace")
        r["stderr"] = (root / f"{cid}.stderr").read_text(errors="replace")
        r.update(built[cid])
    return {"results": results, "runner_rss_kib": ready["rss_kib"], "shared_before": shared_before,
            "shared_after": _snapshot(shared)}


def test_corpus_size():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len([c for c in CASES if not c.slow]) >= 80


@pytest.mark.parametrize("hcase", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                   for c in CASES])
def test_hostile_input(hcase, hostile):
    r = hostile["results"][hcase.id]
    err, out = r["stderr"], r["stdout"]
    assert r["rc"] == 2, f"exit {r['rc']} (want 2)\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1, err[-3000:]
    assert "unexpected" not in error_lines[0], error_lines[0]  # the last-resort handler is not the answer
    assert "MemoryError" not in error_lines[0], error_lines[0]  # (a named, expected out-of-memory is allowed)
    for n in hcase.needles:
        assert n in error_lines[0], (n, error_lines[0])
    d = r["dir"]
    assert not (d / "out").exists() and not (d / "out").is_symlink() or "out" in r["listing"]
    assert sorted(os.listdir(d)) == r["listing"], (sorted(os.listdir(d)), r["listing"])  # no debris, nothing new
    assert _snapshot([d]) == r["before"], "an input of the case changed"
    assert hostile["shared_after"] == hostile["shared_before"], "the shared fixture changed"
    assert r["maxrss_kib"] < hostile["runner_rss_kib"] + RSS_MARGIN_KIB, (r["maxrss_kib"], hostile["runner_rss_kib"])

