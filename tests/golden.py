"""Recorded tensor hashes of every export the test fixtures produce: a refactoring of the engine or of a family must
leave the exported tensors unchanged (names, dtypes, shapes and bytes).

``check_export(name, out_dir)`` compares an export folder's tensors with ``tests/golden/export_hashes.json[name]``.
Run the suite with ``MASKPORT_RECORD_GOLDEN=1`` to (re)write the entries of the tests that ran, and review the diff:
a changed hash is a changed export. The input fixtures are built deterministically (seeded, on the CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden" / "export_hashes.json"
_LOCK = threading.Lock()


def tensor_digests(folder: Path) -> dict[str, str]:
    """``name -> "dtype shape sha256[:20]"`` of every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                t = st.get_tensor(k).contiguous()
                data = t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
                out[k] = f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} {hashlib.sha256(data).hexdigest()[:20]}"
    return dict(sorted(out.items()))


def _summary(d: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def check_export(name: str, out_dir: Path) -> None:
    got = tensor_digests(out_dir)
    assert got, f"{out_dir} holds no tensors"
    with _LOCK:
        recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        if os.environ.get("MASKPORT_RECORD_GOLDEN") == "1":
            recorded[name] = {"summary": _summary(got), "tensors": got}
            GOLDEN.parent.mkdir(parents=True, exist_ok=True)
            GOLDEN.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
            return
    assert name in recorded, f"no recorded hashes for export {name!r}: run with MASKPORT_RECORD_GOLDEN=1"
    want = recorded[name]["tensors"]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    assert not (missing or extra or changed), (
        f"export {name!r} differs from its recorded tensors: {len(missing)} missing {missing[:3]}, {len(extra)} new "
        f"{extra[:3]}, {len(changed)} changed {[(k, want[k], got[k]) for k in changed[:3]]}")


def mapping_tsv(report: dict) -> str:
    """The fully spelled mapping of a conversion report (``--dry-run --report-json``): one line per source tensor
    -> target tensor with the op, then one line per dropped source tensor with its reason. Sorted, so a changed
    mapping is a reviewable diff."""
    rows = []
    for t in report["targets"]:
        for i, src in enumerate(t["sources"]):
            rows.append((src, t["target"], t["op"] + (f" [input {i}]" if len(t["sources"]) > 1 else "")))
    for d in report["dropped"]:
        why = d["reason"] + (f" (superseded by {d['superseded_by']})" if d.get("superseded_by") else "")
        rows.append((d["source"], "-", "drop: " + why))
    lines = ["source\ttarget\top"] + ["\t".join(r) for r in sorted(rows)]
    return "\n".join(lines) + "\n"


def check_mapping_tsv(path: Path, report: dict) -> None:
    """``docs/families/<family>.mapping.tsv`` must equal the mapping the fixture's dry run spells out
    (``MASKPORT_RECORD_MAPPING=1`` rewrites it)."""
    got = mapping_tsv(report)
    if os.environ.get("MASKPORT_RECORD_MAPPING") == "1":
        path.write_text(got)
        return
    assert path.is_file(), f"{path} is missing: run with MASKPORT_RECORD_MAPPING=1"
    want = path.read_text()
    if got != want:
        import difflib

        diff = "".join(list(difflib.unified_diff(want.splitlines(True), got.splitlines(True), str(path), "now"))[:40])
        raise AssertionError(f"the mapping differs from {path}:\n{diff}")


def assert_batched_equals_single(model, tokenizer, images, texts, atol: float = 1e-4, **kwargs) -> list:
    """``predict_forward`` on lists (one batch) gives what it gives one sample at a time: the same answers, the
    same number of masks, probabilities within ``atol`` and masks equal except pixels whose one-by-one
    probability lies within ``atol`` of the threshold (a float tie that padding may move)."""
    import numpy as np

    single = [model.predict_forward(image=i, text=t, tokenizer=tokenizer, return_probabilities=True, **kwargs)
              for i, t in zip(images, texts)]
    batch = model.predict_forward(image=list(images), text=list(texts), tokenizer=tokenizer,
                                  return_probabilities=True, **kwargs)
    assert isinstance(batch, list) and len(batch) == len(single)
    threshold = float(kwargs.get("mask_threshold") or model.config.mask_threshold)
    for n, (s, b) in enumerate(zip(single, batch)):
        assert b["prediction"] == s["prediction"], (n, s["prediction"], b["prediction"])
        assert len(b["prediction_masks"]) == len(s["prediction_masks"]), n
        for ms, mb, ps, pb in zip(s["prediction_masks"], b["prediction_masks"], s["prediction_probabilities"],
                                  b["prediction_probabilities"]):
            assert ms.shape == mb.shape and ms.dtype == mb.dtype == np.bool_
            assert float(np.abs(ps - pb).max()) <= atol, (n, float(np.abs(ps - pb).max()))
            tie = np.abs(ps - threshold) <= atol
            assert np.array_equal(ms[~tie], mb[~tie]), n
    return batch
