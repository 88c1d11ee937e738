"""The trained demo model (examples/tiny-sa2va) quantized to 8 bits keeps its masks (issue 5: Dice >= 0.98 vs bf16).

Slow (a conversion, a GPTQ run with 64 calibration samples and two models predicting 48 held-out samples: about
a minute and a half on 2 cores); run with ``pytest -m slow tests/test_quantize_demo.py``. Needs GPTQModel
(``maskport[quant]``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="GPTQModel is not installed"),
]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-sa2va"
ART = EXAMPLE / "artifacts"


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory):
    from maskport.convert.api import convert_mmengine_to_hf

    out = tmp_path_factory.mktemp("qdemo") / "export-bf16"
    convert_mmengine_to_hf(next((ART / "stage2").glob("iter_*.pth")), base=ART / "base",
                           sam2=ART / "sam2" / "tiny_sam2.pt", out=out, dtype="bf16", progress=False,
                           log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    # loaded under its own name: benchmarks/convert has a shapes.py too
    spec = importlib.util.spec_from_file_location("tiny_sa2va_shapes", EXAMPLE / "shapes.py")
    shapes = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = shapes  # dataclasses look their module up there
    spec.loader.exec_module(shapes)
    root = tmp_path_factory.mktemp("calib")
    shapes.write_calibration(root, 64)
    return root / "samples.jsonl"


def test_gptq_8bit_keeps_the_demo_masks(bf16_export, calib, tmp_path):
    from maskport.quantize.api import quantize_export
    from maskport.verify.api import verify

    out = tmp_path / "gptq-8"
    res = quantize_export(bf16_export, out, method="gptq", bits=8, group_size=32, calib=calib, calib_samples=64,
                          device="cpu", log=lambda *_: None)
    sizes = res.report["sizes"]
    assert sizes["after"]["param_bytes"]["decoder_linears"] < 0.6 * sizes["before"]["param_bytes"]["decoder_linears"]
    v = verify(str(bf16_export), str(out), ART / "heldout" / "samples.jsonl", limit=48, device="cpu",
               progress=False, report_dir=tmp_path / "verify")
    s = v.summary
    assert s["no_mask"] == {"ref": 0, "cand": 0}, s["no_mask"]  # masks were compared, not missing
    assert s["dice"]["mean"] >= 0.98, s["dice"]
    assert v.passed
