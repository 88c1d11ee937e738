"""Write the quantized export folder: the unquantized export with the decoder linears replaced by packed ones.

Tensors:
- every tensor of the decoder layers (``mllm.model.language_model.layers.*``) comes from GPTQModel's saved
  language model, renamed with the ``mllm.`` prefix: the packed linears (``qweight``/``qzeros``/``scales``/
  ``g_idx``/``bias``) and the layer norms (AWQ folds its scales into them);
- every other tensor (vision tower, embeddings, final norm, lm_head, all of SAM2, ``text_hidden_fcs``) is
  copied byte for byte from the unquantized export, so nothing outside the decoder layers changes.

``config.json`` is the export's, plus a ``quantization_config`` that transformers' own GPTQ/AWQ quantizers read
when ``AutoModel.from_pretrained`` builds the composite model:
- GPTQ (optimum + gptqmodel): ``block_name_to_quantize = "mllm.model.language_model.layers"`` and
  ``modules_in_block_to_quantize`` (the 7 decoder linears): optimum replaces exactly those linears and nothing
  else;
- AWQ (gptqmodel): transformers replaces *every* ``nn.Linear`` not matched by ``modules_to_not_convert``, so the
  list names the full prefixes of everything that must stay floating point.
Both carry ``modules_to_not_convert`` = the family's excluded prefixes (its
:class:`~maskport.quantize.targets.QuantTarget`) so the exclusions are explicit in the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..io.safetensors import ST_DTYPES, build_header, dtype_size, read_safetensors_header
from ..io.shards import pack_shards, shard_filenames, write_index
from .backend import DECODER_LINEARS, QuantizeError
from .targets import DECODER_BLOCK, QuantTarget

_QMOD_RE = re.compile(r"^model\.language_model\.layers\.\d+\.(" +
                      "|".join(re.escape(n) for n in DECODER_LINEARS) + r")$")
WEIGHT_FILES_RE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")


def _weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        from ..io.shards import read_weight_map

        return read_weight_map(index)
    single = folder / "model.safetensors"
    if not single.is_file():
        raise QuantizeError(f"{folder} has no model.safetensors(.index.json)")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _tensor_info(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape), read from the headers only."""
    from safetensors import safe_open

    wm = _weight_map(folder)
    out = {}
    for file in sorted(set(wm.values())):
        with safe_open(str(folder / file), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
                sl = f.get_slice(k)
                out[k] = (sl.get_dtype(), list(sl.get_shape()))
    return out


_DTYPE_BYTES = {name: dtype_size(name) for name in ST_DTYPES}  # safetensors dtype name -> bytes per element


def part_of(name: str, target: QuantTarget) -> str:
    """Which part of the composite a tensor belongs to (for the size table): the decoder's linears and the rest of
    its layers, the family's vision prefixes, the language model's other tensors, else the composite's top-level
    module (the mask head, the projection, ...: whatever the family's model holds beside ``mllm``)."""
    if name.startswith("mllm.model.language_model.layers."):
        mod = name[len("mllm."):].rsplit(".", 1)[0]
        return "decoder_linears" if _QMOD_RE.match(mod) else "decoder_other"
    if name.startswith(target.vision_prefixes):
        return "vision"
    if name.startswith("mllm."):
        return "embeddings_lm_head_norm"
    return name.split(".", 1)[0] if "." in name else "other"


def param_bytes(info: dict[str, tuple[str, list[int]]], target: QuantTarget) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, (dtype, shape) in info.items():
        n = 1
        for d in shape:
            n *= int(d)
        part = part_of(name, target)
        out[part] = out.get(part, 0) + n * _DTYPE_BYTES.get(dtype, 4)
    out["total"] = sum(v for k, v in out.items())
    return out


def weight_file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))


def composite_quantization_config(qmllm_dir: Path, method: str, target: QuantTarget) -> dict[str, Any]:
    """transformers-readable ``quantization_config`` for the composite, from GPTQModel's saved one."""
    raw = json.loads((qmllm_dir / "config.json").read_text()).get("quantization_config")
    if not raw:
        raise QuantizeError(f"GPTQModel wrote no quantization_config in {qmllm_dir}/config.json")
    keep = ("bits", "group_size", "desc_act", "sym", "quant_method", "pack_dtype", "lm_head")
    qc = {k: raw[k] for k in keep if k in raw}
    if method == "gptq":
        fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
        qc.update(quant_method="gptq", format=fmt, checkpoint_format=fmt,
                  block_name_to_quantize=DECODER_BLOCK,
                  modules_in_block_to_quantize=[list(DECODER_LINEARS)])
    else:
        fmt = raw.get("version") or raw.get("format") or "gemm"
        qc.update(quant_method="awq", version=fmt, format=fmt, zero_point=bool(raw.get("zero_point", True)))
        qc.pop("desc_act", None)
        qc["sym"] = not qc["zero_point"]
    qc["modules_to_not_convert"] = list(target.excluded_prefixes)
    qc["lm_head"] = False
    qc["quantized_by"] = {"tool": "maskport", "backend": "gptqmodel",
                          "note": "only " + DECODER_BLOCK + ".*.{" + ",".join(DECODER_LINEARS) +
                                  "} are quantized; modules_to_not_convert stay in the export's dtype"}
    return qc


def mark_standalone_exclusions(qmllm_dir: Path, method: str, target: QuantTarget) -> dict[str, Any]:
    """Make GPTQModel's standalone MLLM folder safe for other loaders.

    GPTQModel 7.6 writes an AWQ ``quantization_config`` without ``modules_to_not_convert``; transformers then
    turns every linear of the vision tower into an AWQ layer that the checkpoint has no packed weights for
    (they load uninitialised: NaN image features). We name the excluded prefixes explicitly (and, for GPTQ, the
    block that is quantized), in ``config.json`` and ``quantize_config.json``.
    """
    changed = {}
    for fname in ("config.json", "quantize_config.json"):
        path = qmllm_dir / fname
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        qc = data.get("quantization_config") if fname == "config.json" else data
        if not isinstance(qc, dict):
            continue
        qc["modules_to_not_convert"] = list(target.standalone_excluded)
        if method == "gptq":
            qc["block_name_to_quantize"] = "model.language_model.layers"
        path.write_text(json.dumps(data, indent=2) + "\n")
        changed[fname] = qc
    return changed


def plan_tensors(src_dir: Path, qmllm_dir: Path) -> tuple[list[tuple[str, Path, str]], list[str]]:
    """Output tensors as (target name, file, source name), and the quantized module names (composite prefix).

    Every tensor of the decoder layers (``mllm.model.language_model.layers.*``) comes from GPTQModel's result:
    the packed linears, and also the layer norms, because AWQ folds its activation scales into the op before
    each scaled linear group (``input_layernorm``, ``post_attention_layernorm``). Everything else comes from
    the unquantized export, byte for byte.
    """
    src_map = _weight_map(src_dir)
    q_map = _weight_map(qmllm_dir)
    qmods = sorted({k[: -len(".qweight")] for k in q_map if k.endswith(".qweight")})
    if not qmods:
        raise QuantizeError("GPTQModel's output has no packed (qweight) tensors: nothing was quantized")
    bad = [m for m in qmods if not _QMOD_RE.match(m)]
    if bad:
        raise QuantizeError(f"GPTQModel quantized modules outside the decoder linears: {bad[:5]}")
    layers = "model.language_model.layers."
    out: list[tuple[str, Path, str]] = []
    src_layer_modules = set()
    for name, file in src_map.items():
        if name.startswith("mllm." + layers):
            src_layer_modules.add(name[5:].rsplit(".", 1)[0])
            continue
        out.append((name, src_dir / file, name))
    q_layer_modules = set()
    for name, file in q_map.items():
        if name.startswith(layers):
            q_layer_modules.add(name.rsplit(".", 1)[0])
            out.append(("mllm." + name, qmllm_dir / file, name))
    if src_layer_modules != q_layer_modules:
        diff = sorted(src_layer_modules ^ q_layer_modules)
        raise QuantizeError(f"GPTQModel's decoder layers do not match the export's: {diff[:5]}")
    return out, ["mllm." + m for m in qmods]


_COPY_CHUNK = 8 << 20  # bytes per read/write pass when copying a tensor's bytes


def _copy_range(src: int, offset: int, nbytes: int, dst: int, what: str) -> None:
    """Append ``nbytes`` of file ``src`` from ``offset`` to ``dst``, a chunk at a time."""
    pos = 0
    while pos < nbytes:
        chunk = os.pread(src, min(nbytes - pos, _COPY_CHUNK), offset + pos)
        if not chunk:
            raise QuantizeError(f"{what}: unexpected end of file at byte {offset + pos} (truncated?)")
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
        pos += len(chunk)


def write_tensors(entries: list[tuple[str, Path, str]], out_dir: Path, max_shard_bytes: int = 2 * 1024 ** 3) -> list[str]:
    """Write the tensors ``entries`` = (target name, safetensors file, source name) as sharded safetensors in
    ``out_dir`` and return the shard file names.

    Tensors are sorted by target name and packed greedily into shards of at most ``max_shard_bytes`` bytes of
    data (:func:`maskport.io.shards.pack_shards`; a larger tensor gets a shard of its own); names and the index
    (with more than one shard) come from :mod:`maskport.io.shards`, headers from
    :func:`maskport.io.safetensors.build_header` (metadata ``{"format": "pt"}``). Each tensor's bytes are copied
    from its source file as they lie there (the sources' headers are checked by
    :func:`~maskport.io.safetensors.read_safetensors_header`), a few MB at a time: no tensor is loaded."""
    headers: dict[Path, dict] = {}
    located = []
    for target, file, source in sorted(entries, key=lambda e: e[0]):
        if file not in headers:
            headers[file] = read_safetensors_header(file)[0]
        if source not in headers[file]:
            raise QuantizeError(f"{file} has no tensor {source}")
        located.append((target, headers[file][source]))
    groups = pack_shards(located, lambda e: e[1].info.nbytes, max_shard_bytes)
    names = shard_filenames(len(groups))
    fds: dict[Path, int] = {}
    try:
        for name, group in zip(names, groups):
            fd = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
            try:
                header = memoryview(build_header([(t, e.info) for t, e in group], {"format": "pt"}))
                while header:
                    header = header[os.write(fd, header):]
                for _, e in group:
                    if e.file not in fds:
                        fds[e.file] = os.open(e.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    _copy_range(fds[e.file], e.offset, e.info.nbytes, fd, str(e.file))
            finally:
                os.close(fd)
    finally:
        for src in fds.values():
            os.close(src)
    if len(groups) > 1:
        write_index(out_dir, {t: name for name, group in zip(names, groups) for t, _ in group},
                    sum(e.info.nbytes for _, e in located))
    return names


def copy_side_files(src_dir: Path, out_dir: Path, skip: Iterable[str] = ()) -> list[str]:
    copied = []
    skip = set(skip)
    for p in sorted(src_dir.iterdir()):
        if not p.is_file() or WEIGHT_FILES_RE.match(p.name) or p.name in skip:
            continue
        shutil.copy2(p, out_dir / p.name)
        copied.append(p.name)
    return copied


def write_config(src_dir: Path, out_dir: Path, quantization_config: dict[str, Any], provenance: dict[str, Any]) -> dict:
    from ..io.jsonfile import read_json_file

    cfg = read_json_file(src_dir / "config.json", what="export config")
    cfg["quantization_config"] = quantization_config
    mp = dict(cfg.get("maskport") or {})
    mp["quantization"] = provenance
    cfg["maskport"] = mp
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def model_card_section(report: dict[str, Any]) -> str:
    s = report["settings"]
    sz = report["sizes"]
    lines = [
        "",
        "## Quantization (maskport quantize)",
        "",
        f"- method: **{s['method'].upper()}**, {s['bits']}-bit, group size {s['group_size']}, "
        f"{'sym' if s['sym'] else 'asym (zero-point)'}" + (", desc_act" if s.get("desc_act") else ""),
        f"- quantized: the language model's decoder linears only ({report['quantized_modules_count']} modules "
        f"under `{DECODER_BLOCK}`); kept in the export's dtype: "
        + ", ".join(f"`{p}`" for p in report["excluded_prefixes"]),
        (f"- calibration: {report['calibration']['samples']} sample(s), {report['calibration']['source']}, "
        f"{report['calibration']['tokens']} tokens"),
        f"- weights: {sz['before']['files_bytes'] / 1e6:.1f} MB -> {sz['after']['files_bytes'] / 1e6:.1f} MB",
        ("- loading needs `gptqmodel` (and `optimum` for GPTQ): `pip install 'maskport[quant]'`, then "
        "`AutoModel.from_pretrained(dir, trust_remote_code=True)` as for the unquantized export."),
        "",
    ]
    return "\n".join(lines)
