"""Session fixtures: one tiny Sa2VA-Qwen2.5-VL training run (mmengine + DeepSpeed) and its conversions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """A genuine tiny Sa2VA training output: base folder, SAM2 .pt, mmengine iter_2.pth, DeepSpeed ZeRO-2 dir,
    and the un-converted pieces in memory (the oracles)."""
    from maskport.testing.sa2va_qwen2_5_vl import make_sa2va_qwen_fixture

    return make_sa2va_qwen_fixture(tmp_path_factory.mktemp("sa2va_fx"), seed=0, deepspeed=True)


def _convert(fx, out: Path, **kw):
    from maskport.convert.api import convert_mmengine_to_hf

    return convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=out, progress=False,
                                  **kw)


@pytest.fixture(scope="session")
def export_bf16(fx, tmp_path_factory):
    """The default conversion (output dtype = training dtype, bf16)."""
    from tests.golden import check_export

    out = tmp_path_factory.mktemp("exports") / "sa2va-bf16"
    res = _convert(fx, out, sha256=True)
    check_export("sa2va-qwen2_5-vl/bf16", out)
    return res


@pytest.fixture(scope="session")
def export_fp32(fx, tmp_path_factory):
    """An fp32 conversion, for oracle comparisons at fp32 tolerances."""
    from tests.golden import check_export

    out = tmp_path_factory.mktemp("exports") / "sa2va-fp32"
    res = _convert(fx, out, dtype="fp32")
    check_export("sa2va-qwen2_5-vl/fp32", out)
    return res


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """The embedded demo (examples/tiny-sa2va) converted as `maskport demo` converts it (fp32, the SAM2
    normalisation its training used): a really trained model that answers and segments. Shared by the demo
    tests and the serve tests."""
    from maskport.convert.api import convert_mmengine_to_hf
    from maskport.demo import DemoArtifacts

    art = DemoArtifacts.find(Path(__file__).resolve().parents[1] / "examples" / "tiny-sa2va" / "artifacts")
    out = tmp_path_factory.mktemp("demo") / "tiny-sa2va"
    convert_mmengine_to_hf(art.ckpt, base=art.base, sam2=art.sam2, out=out, dtype="fp32", progress=False,
                           sam2_normalization="exact", log=lambda *_: None)
    return out
