"""maskport.io: the one size parser, the safetensors header reader/builder, sharding and the atomic output folder.

Oracles: sizes are computed here from the unit definitions (10**9, 2**30, ...); headers are read back with the
safetensors library; shard names and packing are compared with huggingface_hub's own splitter."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from maskport.errors import MissingInput, UnreadableFile
from maskport.io import (
    INDEX_NAME,
    TensorInfo,
    atomic_output_dir,
    build_header,
    pack_shards,
    parse_size,
    read_safetensors_header,
    shard_filenames,
    write_index,
)
from maskport.io.safetensors import ST_DTYPE_NAMES, ST_DTYPES

# ------------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("text,expected", [
    ("2GB", 2 * 10**9), ("2GiB", 2 * 2**30), ("500MiB", 500 * 2**20), ("500MB", 500 * 10**6),
    ("1.5GB", 15 * 10**8), ("1024", 1024), (1024, 1024), ("7B", 7), ("1KB", 1000), ("1KiB", 1024),
    ("3TB", 3 * 10**12), ("3TiB", 3 * 2**40), (" 2 gb ", 2 * 10**9), ("2gib", 2 * 2**30), ("500mb", 500 * 10**6),
    ("1.001KB", 1001),  # exact decimal arithmetic: float gives 1000.9999999999999
    (".5KiB", 512), ("1.9B", 1),  # whole bytes, rounded down
    (str(2**53), 2**53),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["infGB", "nanMB", "inf", "0", 0, "0GB", "-1GB", -5, "", "   ", "2XB", "GB", "2G",
                                 "2 G B", "1e9", "1,5GB", "2GBs", "lots", True, False, None, 2.5, "0.4B",
                                 "10000TB", 2**53 + 1, "٣GB"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError) as ei:
        parse_size(bad)
    msg = str(ei.value)
    assert "\n" not in msg and repr(bad) in msg and "2GB" in msg and "500MiB" in msg


def _stop(captured, real):
    def wrapper(value):
        captured.append(real(value))
        raise MissingInput("stopped after parsing --max-shard-size")

    return wrapper


def _quantizable_export(tmp_path):
    from maskport.families import FAMILIES

    model_type = next(f.spec.model_type for f in FAMILIES.values() if f.spec.quant_target)
    export = tmp_path / "export"
    export.mkdir(exist_ok=True)
    (export / "config.json").write_text(json.dumps({"model_type": model_type}))
    return export


def _command_args(command, tmp_path):
    if command == "mmengine-to-hf":
        return ["convert", "mmengine-to-hf", str(tmp_path / "iter_1.pth"), "-o", str(tmp_path / "out")]
    if command == "sa2va-hf-to-native":
        (tmp_path / "released").mkdir(exist_ok=True)
        return ["convert", "sa2va-hf-to-native", str(tmp_path / "released"), "-o", str(tmp_path / "out")]
    return ["quantize", str(_quantizable_export(tmp_path)), "-o", str(tmp_path / "out"), "--calib-text-only"]


COMMANDS = ["mmengine-to-hf", "sa2va-hf-to-native", "quantize"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reads_max_shard_size_with_the_same_units(command, tmp_path, monkeypatch):
    """The CLI option goes through each command's own path to the one parser; the parser's result is captured
    there and the command stopped, so nothing is read or written."""
    from click.testing import CliRunner

    import maskport.convert.api as convert_api
    import maskport.io as mio
    import maskport.quantize.api as quantize_api
    from maskport.cli import main

    module = quantize_api if command == "quantize" else convert_api
    got = {}
    for value in ("500MiB", "2GB", "2GiB", "1.5GB"):
        captured: list[int] = []
        monkeypatch.setattr(module, "parse_size", _stop(captured, mio.parse_size))
        r = CliRunner().invoke(main, _command_args(command, tmp_path) + ["--max-shard-size", value])
        assert r.exit_code == 2 and "stopped after parsing --max-shard-size" in r.output, r.output
        assert len(captured) == 1
        got[value] = captured[0]
    assert got == {"500MiB": 500 * 2**20, "2GB": 2 * 10**9, "2GiB": 2 * 2**30, "1.5GB": 15 * 10**8}
    # and the default ("2GB")
    captured = []
    monkeypatch.setattr(module, "parse_size", _stop(captured, mio.parse_size))
    CliRunner().invoke(main, _command_args(command, tmp_path))
    assert captured == [2 * 10**9]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bad", ["2G", "infGB", "0"])
def test_every_command_refuses_a_bad_max_shard_size_in_one_line(command, bad, tmp_path):
    from click.testing import CliRunner

    from maskport.cli import main

    r = CliRunner().invoke(main, _command_args(command, tmp_path) + ["--max-shard-size", bad])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "--max-shard-size" in lines[0] and repr(bad) in lines[0], r.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(-3, 6),
        "i32": torch.arange(10, dtype=torch.int32).reshape(2, 5),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "odd": torch.randn(3, generator=g).half(),  # 6 bytes: later offsets are not multiples of 8
    }


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_header_round_trip_through_safe_open_and_our_reader(tmp_path):
    tensors = _tensors()
    meta = {"format": "pt", "maskport_family": "x"}
    header = build_header(((k, TensorInfo(tuple(t.shape), t.dtype)) for k, t in tensors.items()), meta)
    (n,) = struct.unpack("<Q", header[:8])
    assert len(header) == 8 + n and n % 8 == 0
    f = tmp_path / "model.safetensors"
    f.write_bytes(header + b"".join(_raw(t) for t in tensors.values()))

    with safe_open(str(f), "pt") as st:
        assert st.metadata() == meta and set(st.keys()) == set(tensors)
        for k, t in tensors.items():
            back = st.get_tensor(k)
            assert back.dtype == t.dtype and back.shape == t.shape, k
            assert _raw(back) == _raw(t), k

    entries, got_meta = read_safetensors_header(f)
    assert got_meta == meta and list(entries) == list(tensors)
    data = f.read_bytes()
    for k, t in tensors.items():
        e = entries[k]
        assert e.info == TensorInfo(tuple(t.shape), t.dtype) and e.file == f
        assert data[e.offset:e.offset + e.info.nbytes] == _raw(t), k
    assert entries["f32"].offset == 8 + n  # laid out from the first byte after the header, in the given order


def test_reader_agrees_with_files_the_safetensors_library_wrote(tmp_path):
    tensors = _tensors()
    f = tmp_path / "lib.safetensors"
    save_file(tensors, str(f), metadata={"a": "b"})
    entries, meta = read_safetensors_header(f)
    assert meta == {"a": "b"} and set(entries) == set(tensors)
    data = f.read_bytes()
    for k, t in tensors.items():
        assert entries[k].info == TensorInfo(tuple(t.shape), t.dtype)
        assert data[entries[k].offset:entries[k].offset + entries[k].info.nbytes] == _raw(t), k


def test_one_dtype_table_both_ways():
    assert all(ST_DTYPES[ST_DTYPE_NAMES[dt]] is dt for dt in ST_DTYPE_NAMES)
    assert len(ST_DTYPE_NAMES) == len(ST_DTYPES)
    import maskport.convert.sources as sources
    import maskport.convert.writer as writer

    assert writer.ST_DTYPE_NAMES is ST_DTYPE_NAMES and sources._ST_DTYPES is ST_DTYPES
    assert sources.read_safetensors_header is read_safetensors_header and sources.TensorInfo is TensorInfo
    assert writer.parse_size is parse_size


def _file_with_header(path, header: dict, data_len: int):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    return path


@pytest.mark.parametrize("header,data_len,match", [
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8, "unsupported dtype C64"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "bad shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 8, "do not hold"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4, "past the end"),
    ({"w": {"dtype": "F32", "shape": [2]}}, 8, "malformed entry"),
    ([1, 2], 0, "not a JSON object"),
])
def test_reader_refuses_malformed_headers(tmp_path, header, data_len, match):
    f = _file_with_header(tmp_path / "x.safetensors", header, data_len)
    with pytest.raises(UnreadableFile, match=match) as ei:
        read_safetensors_header(f)
    assert "\n" not in str(ei.value) and str(f) in str(ei.value)


def test_builder_refuses_what_safetensors_cannot_hold():
    info = TensorInfo((2,), torch.float32)
    with pytest.raises(ValueError, match="twice"):
        build_header([("a", info), ("a", info)])
    with pytest.raises(ValueError, match="no safetensors name"):
        build_header([("c", TensorInfo((2,), torch.complex64))])
    with pytest.raises(ValueError, match="strings"):
        build_header([("a", info)], {"n": 1})
    with pytest.raises(ValueError, match="reserved"):
        build_header([("__metadata__", info)], {})


# ------------------------------------------------------------------------------------------------ shards


def test_shard_names_and_packing_match_huggingface_hub():
    from huggingface_hub import split_torch_state_dict_into_shards

    g = torch.Generator().manual_seed(1)
    limit = 4000
    for trial in range(20):
        sizes = torch.randint(0, limit // 4 + 1, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        sd = {f"t{i:02d}": torch.zeros(int(n), dtype=torch.float32) for i, n in enumerate(sizes)}  # <= limit bytes
        hub = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
        groups = pack_shards(list(sd), lambda k: sd[k].numel() * 4, limit)
        names = shard_filenames(len(groups))
        ours = {name: list(group) for name, group in zip(names, groups)}
        assert ours == {f: list(ts) for f, ts in hub.filename_to_tensors.items()}, trial


def test_packing_is_greedy_in_order_and_isolates_oversized_items():
    sizes = [3, 4, 10, 2, 2, 2, 0, 5]
    groups = pack_shards(range(len(sizes)), lambda i: sizes[i], 6)
    assert [i for gr in groups for i in gr] == list(range(len(sizes)))  # order kept, nothing lost
    assert [g for g in groups if 2 in g] == [[2]]                      # 10 > 6: a shard of its own
    for a, b in zip(groups, groups[1:]):
        assert sum(sizes[i] for i in a) + sizes[b[0]] > 6              # greedy: b's first item did not fit in a
    assert all(sum(sizes[i] for i in gr) <= 6 for gr in groups if gr != [2])
    assert pack_shards([], len, 6) == []
    with pytest.raises(ValueError):
        pack_shards([1], lambda x: x, 0)


def test_shard_filenames():
    assert shard_filenames(1) == ["model.safetensors"]
    three = shard_filenames(3)
    assert three == [f"model-{i:05d}-of-{3:05d}.safetensors" for i in (1, 2, 3)] and shard_filenames(0) == []
    with pytest.raises(ValueError):
        shard_filenames(-1)


def test_index_file(tmp_path):
    wm = {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}
    path = write_index(tmp_path, wm, 1234)
    assert path == tmp_path / INDEX_NAME
    assert json.loads(path.read_text()) == {"metadata": {"total_size": 1234}, "weight_map": wm}


def test_quantize_writer_shards_through_the_io_package(tmp_path):
    """quantize's write_tensors: renamed tensors copied byte for byte from two files into valid shards."""
    from maskport.quantize.folder import write_tensors

    g = torch.Generator().manual_seed(2)
    a = {"x.weight": torch.randn(40, 10, generator=g).bfloat16(), "x.qweight": torch.randint(-9, 9, (8, 25), generator=g,
                                                                                            dtype=torch.int32)}
    b = {"big": torch.randn(600, generator=g), "n": torch.arange(3), "s": torch.tensor(1.0).half()}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    entries = [("mllm." + k, tmp_path / "a.safetensors", k) for k in a] + \
              [("z." + k, tmp_path / "b.safetensors", k) for k in b]
    expect = {"mllm." + k: v for k, v in a.items()} | {"z." + k: v for k, v in b.items()}
    out = tmp_path / "out"
    out.mkdir()
    limit = 1000  # bytes: 800 + 800 + 2400 (oversized) + 24 + 2
    names = write_tensors(entries, out, limit)
    order = sorted(expect)
    groups = pack_shards(order, lambda k: expect[k].numel() * expect[k].element_size(), limit)
    assert names == shard_filenames(len(groups)) and len(names) > 1
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expect.values())
    assert index["weight_map"] == {k: n for n, gr in zip(names, groups) for k in gr}
    seen = set()
    for name in names:
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():  # noqa: SIM118
                t = f.get_tensor(k)
                assert t.dtype == expect[k].dtype and _raw(t) == _raw(expect[k]), k
                seen.add(k)
        assert oct((out / name).stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert seen == set(expect)


def test_quantize_writer_names_a_missing_tensor(tmp_path):
    from maskport.quantize.backend import QuantizeError
    from maskport.quantize.folder import write_tensors

    save_file({"a": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(QuantizeError, match="has no tensor nope"):
        write_tensors([("x", tmp_path / "a.safetensors", "nope")], tmp_path, 100)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ------------------------------------------------------------------------------------------------ atomic folder


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_output_dir_success(tmp_path):
    out = tmp_path / "sub" / "out"  # the parent is created
    with atomic_output_dir(out) as tmp:
        assert tmp == out.parent / f".out.maskport-partial-{os.getpid()}"
        assert tmp.is_dir() and not any(tmp.iterdir()) and not out.exists()
        (tmp / "model.safetensors").write_text("x")
    assert (out / "model.safetensors").read_text() == "x"
    assert _hidden(out.parent) == []


def test_atomic_output_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_an_existing_output_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(MissingInput, match="--overwrite"):
        with atomic_output_dir(out):
            pytest.fail("the block must not run")
    assert (out / "keep").read_text() == "old" and _hidden(tmp_path) == []
    # an output that appears while writing is not replaced either
    new = tmp_path / "new"
    with pytest.raises(MissingInput, match="appeared"):
        with atomic_output_dir(new) as tmp:
            (tmp / "a").write_text("mine")
            new.mkdir()
            (new / "b").write_text("theirs")
    assert [p.name for p in new.iterdir()] == ["b"] and _hidden(tmp_path) == []


def test_atomic_output_dir_overwrite_swaps_at_the_end(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # the old output stays usable until the end
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _hidden(tmp_path) == []
    # a failed overwrite keeps the old output
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "other.txt").write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and _hidden(tmp_path) == []


def test_atomic_output_dir_puts_the_old_output_back_when_the_swap_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            tmp.rmdir()  # the final rename of the temporary folder then fails
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and _hidden(tmp_path) == []


def test_atomic_output_dir_replaces_a_stale_partial_folder_of_the_same_pid(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.maskport-partial-{os.getpid()}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    with atomic_output_dir(out) as tmp:
        assert tmp == stale and not any(tmp.iterdir())
    assert out.is_dir() and not any(out.iterdir()) and _hidden(tmp_path) == []
