"""Property-based fuzzing (hypothesis) of every parser of untrusted bytes: each either returns a well-formed value or
raises maskport's one-line error type, never anything else, and stays bounded.

- safetensors headers: arbitrary bytes, and structured headers; whatever our reader accepts, the safetensors library
  (an independent implementation) accepts too, with the same names, dtypes and shapes;
- the bounded JSON reader: arbitrary text; where the standard library parses it (no duplicate keys, not too deep),
  the values are equal;
- shard indexes (``*.index.json``): arbitrary JSON values;
- the pickle allowlist loader: arbitrary bytes, mutated pickles and mutated torch zip files; no code runs;
- the training-config evaluator: random Python-like texts and random expression trees;
- samples JSONL and COCO/RefCOCO readers: arbitrary lines and JSON values.

``MASKPORT_FUZZ_EXAMPLES`` scales the number of examples (default: about 60 s on two cores for the whole file);
longer runs and what they found are recorded in docs/security.md.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from maskport.errors import MaskportError  # noqa: E402

SCALE = float(os.environ.get("MASKPORT_FUZZ_EXAMPLES", "1"))


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30)


# ------------------------------------------------------------------------------------------------ JSON


@fuzz(400)
@given(st.text(max_size=300) | json_values.map(json.dumps))
def test_bounded_json_reader(text):
    from maskport.io.jsonfile import JsonError, loads_bounded

    try:
        ours = loads_bounded(text, max_depth=8)
    except JsonError:
        return
    assert json.loads(text) == ours  # NaN never gets here: its literal is refused


@fuzz(150)
@given(st.integers(1, 3000), st.sampled_from(["[", "{\"a\":"]))
def test_bounded_json_depth(depth, opener):
    from maskport.io.jsonfile import JsonError, loads_bounded

    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + closer * depth
    try:
        loads_bounded(text, max_depth=64)
        assert depth <= 64
    except JsonError as exc:
        assert depth > 63 and "deeper" in str(exc)


# ------------------------------------------------------------------------------------------------ safetensors


def _write_st(path: Path, header_bytes: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


@fuzz(400)
@given(st.binary(max_size=400))
def test_safetensors_reader_arbitrary_bytes(tmp_path, raw):
    from maskport.io.safetensors import read_safetensors_header

    p = tmp_path / "x.safetensors"
    p.write_bytes(raw)
    try:
        read_safetensors_header(p)
    except MaskportError:
        pass


entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "C64", 3, ["F32"]]),
    "shape": st.lists(st.integers(-1, 4), max_size=3) | st.just("2"),
    "data_offsets": st.lists(st.integers(-1, 64), min_size=2, max_size=2) | st.just([0]),
})


@fuzz(500)
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d", "__metadata__"]), entry, max_size=4),
       st.integers(0, 80))
def test_safetensors_reader_agrees_with_the_library(tmp_path, header, data_len):
    """Whatever our reader accepts, safetensors' own reader accepts with the same names, dtypes and shapes."""
    from safetensors import safe_open

    from maskport.io.safetensors import read_safetensors_header

    p = _write_st(tmp_path / "x.safetensors", json.dumps(header).encode(), b"\x00" * data_len)
    try:
        entries, _ = read_safetensors_header(p)
    except MaskportError:
        return
    with safe_open(str(p), "pt") as f:
        keys = set(f.keys())
        assert keys == set(entries)
        for k in keys:
            sl = f.get_slice(k)
            assert tuple(sl.get_shape()) == entries[k].info.shape
            t = f.get_tensor(k)
            assert t.dtype == entries[k].info.dtype


# ------------------------------------------------------------------------------------------------ shard index


@fuzz(300)
@given(json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=6), st.text(max_size=12) | st.integers() | st.none(), max_size=4)}))
def test_index_reader(tmp_path, value):
    from maskport.io.shards import read_weight_map

    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "model-00001-of-00001.safetensors").write_bytes(b"")
    idx = d / "model.safetensors.index.json"
    idx.write_text(json.dumps(value))
    try:
        wm = read_weight_map(idx)
    except MaskportError:
        return
    for f in wm.values():
        assert "/" not in f and "\\" not in f and f not in ("", ".", "..")
        assert (d / f).resolve().parent == d.resolve()


# ------------------------------------------------------------------------------------------------ pickles


def _genuine_torch_file() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, "meta": {"cfg": "x = 1"}},
               buf)
    return buf.getvalue()


_GENUINE = None


def _genuine():
    global _GENUINE
    if _GENUINE is None:
        _GENUINE = _genuine_torch_file()
    return _GENUINE


@fuzz(250)
@given(st.binary(max_size=200) | st.binary(max_size=120).map(lambda b: b"\x80\x02" + b))
def test_pickle_loader_arbitrary_bytes(tmp_path, raw):
    from maskport.convert.safe_load import safe_torch_load

    p = tmp_path / "x.pth"
    p.write_bytes(raw)
    try:
        safe_torch_load(p)
    except MaskportError:
        pass


@fuzz(250)
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8))
@example(flips=[(49204, 2)])  # found by a 10x run: zipfile.is_zipfile raised BadZipFile ("span multiple disks")
def test_pickle_loader_mutated_torch_files(tmp_path, flips):
    from maskport.convert.safe_load import safe_torch_load

    raw = bytearray(_genuine())
    for pos, val in flips:
        raw[pos % len(raw)] = val
    p = tmp_path / "x.pth"
    p.write_bytes(bytes(raw))
    try:
        safe_torch_load(p)
    except MaskportError:
        pass


@fuzz(150)
@given(st.sampled_from(["posix system", "builtins eval", "builtins exec", "subprocess Popen", "os system",
                        "builtins getattr", "torch.serialization load", "numpy.testing._private.utils runstring"]),
       st.binary(max_size=20))
def test_pickle_loader_never_runs_named_code(tmp_path, glob, tail):
    """A pickle naming a callable with an argument that would leave a marker file: refused, and no marker."""
    from maskport.convert.safe_load import safe_torch_load

    marker = tmp_path / "ran"
    mod, name = glob.split()
    arg = f"touch {marker}".encode()
    raw = (b"\x80\x02c" + mod.encode() + b"\n" + name.encode() + b"\nq\x00X" + struct.pack("<I", len(arg)) + arg
           + b"q\x01\x85q\x02Rq\x03." + tail)
    p = tmp_path / "x.pth"
    p.write_bytes(raw)
    with pytest.raises(MaskportError):
        safe_torch_load(p)
    assert not marker.exists()
    zp = tmp_path / "z.pth"  # the same inside torch's zip layout
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("archive/data.pkl", raw)
        z.writestr("archive/version", b"3\n")
    with pytest.raises(MaskportError):
        safe_torch_load(zp)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ training config


names = st.sampled_from(["a", "b", "c", "dict", "x"])
exprs = st.recursive(
    st.integers(-10 ** 30, 10 ** 30).map(str) | st.floats(allow_nan=False).map(repr) | st.text(max_size=5).map(repr)
    | names,
    lambda c: st.builds(lambda a, op, b: f"({a} {op} {b})", c, st.sampled_from(["+", "-", "*", "/", "**", "%"]), c)
    | st.lists(c, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
    | st.lists(st.tuples(names, c), max_size=3).map(lambda kv: "dict(" + ", ".join(f"{k}={v}" for k, v in kv) + ")")
    | st.lists(st.tuples(c, c), max_size=3).map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}")
    | st.builds(lambda f, a: f"{f}({a})", names, c) | c.map(lambda e: f"-{e}"),
    max_leaves=25)


@fuzz(400)
@given(st.lists(st.tuples(names, exprs), min_size=1, max_size=12))
def test_training_config_evaluator_expressions(program):
    from maskport.convert.training_config import ConfigTooComplex, TrainingConfig

    text = "\n".join(f"{n} = {e}" for n, e in program) + "\nmodel = dict(llm_lora=dict(r=8, lora_alpha=a))\n"
    t0 = time.monotonic()
    try:
        TrainingConfig.from_text(text)
    except ConfigTooComplex:
        pass
    assert time.monotonic() - t0 < 10


@fuzz(300)
@given(st.text(max_size=400))
def test_training_config_evaluator_text(text):
    from maskport.convert.training_config import ConfigTooComplex, TrainingConfig

    try:
        TrainingConfig.from_text(text)
    except ConfigTooComplex:
        pass


@fuzz(60)
@given(st.integers(1, 80), st.sampled_from(["x = x * x", "x = x + x", "x = [x, x]", "x = dict(a=x, b=x)",
                                             "x = {1: x, 2: x}", "x = x + 'ab'"]))
def test_training_config_growth_is_bounded(n, step):
    from maskport.convert.training_config import ConfigTooComplex, TrainingConfig

    t0 = time.monotonic()
    try:
        TrainingConfig.from_text("x = 7\n" + (step + "\n") * n)
    except ConfigTooComplex:
        pass
    assert time.monotonic() - t0 < 6


# ------------------------------------------------------------------------------------------------ samples


@fuzz(300)
@given(st.lists(json_values.map(json.dumps) | st.text(max_size=60), min_size=1, max_size=5))
def test_samples_jsonl_reader(tmp_path, lines):
    from PIL import Image

    from maskport.verify.samples import load_jsonl

    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(lines) + "\n")
    try:
        samples = load_jsonl(p)
    except MaskportError:
        return
    for s in samples:
        assert isinstance(s.prompt, str) and s.image_path.is_file()


@fuzz(200)
@given(json_values, json_values | st.fixed_dictionaries({
    "images": st.lists(st.fixed_dictionaries({"id": st.integers(0, 3) | st.text(max_size=2),
                                              "file_name": st.sampled_from(["img.png", "../x", 5]),
                                              "height": st.integers(-1, 10 ** 10), "width": st.integers(-1, 8)}),
                       max_size=3),
    "annotations": st.lists(st.fixed_dictionaries({"id": st.integers(0, 3), "segmentation": json_values}),
                            max_size=3)}))
def test_coco_readers(tmp_path, refs, instances):
    from PIL import Image

    from maskport.verify.samples import load_refcoco

    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    try:
        load_refcoco(tmp_path / "refs.json", tmp_path / "instances.json", tmp_path, split=None)
    except MaskportError:
        pass


@fuzz(100)
@given(st.binary(max_size=120))
def test_refs_pickle_reader(tmp_path, raw):
    from maskport.verify.samples import _read_refs

    p = tmp_path / "refs.p"
    p.write_bytes(raw)
    try:
        refs = _read_refs(p)
    except MaskportError:
        return
    assert isinstance(refs, list)
