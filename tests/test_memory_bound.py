"""The engine never holds the whole state dict: peak RSS of a real ``maskport convert`` of a ~520 MB input set,
measured in a subprocess, stays well under the input size.

The inputs are written by ``benchmarks/convert/generate.py`` (the benchmark's generator) at small shapes: a
Qwen2.5-VL base with 8 wide layers and a 32000-row vocabulary (bf16 safetensors, ~370 MB), a tiny SAM2 with its
config beside it, and an mmengine checkpoint with LoRA r=64 on every LLM linear and 32000-row
``modules_to_save`` embed_tokens/lm_head (~155 MB). Bound: the RSS of a process that only imports what a
conversion imports, plus 0.4 x the input size. An engine that materialised (or kept mapped and touched) the
inputs would sit at import RSS + the whole input size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# runs argv[1:] as a child process and prints the child's peak RSS (KiB): the process that is measured is exactly
# the command, not this wrapper
_MEASURE = textwrap.dedent("""
    import resource, subprocess, sys
    rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    sys.stderr.write(rc.stderr[-3000:])
    sys.exit(rc.returncode)
""")

_IMPORTS = textwrap.dedent("""
    import torch, transformers
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, GenerationConfig
    import maskport.cli
    from maskport.convert import api, sources, writer
    from maskport.families.sa2va_qwen2_5_vl import mapping, family
    from maskport.families.sa2va_qwen2_5_vl.remote.modeling_sa2va_qwen import Sa2VAQwenModel
""")

CI_ENTRY = dict(
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=32000, max_window_layers=8, tie_word_embeddings=False),
    vision=dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[1]),
    vision_out=1024, tie=False, vocab_rows=32000, lora_r=64, lora_alpha=128,
)


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _MEASURE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


def _peak_rss_kib(proc: subprocess.Popen, timeout: int = 300) -> int:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return int(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and page accounting: Linux")
def test_conversion_peak_rss_stays_well_under_the_input_size(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks" / "convert"))
    import generate
    from maskport.testing.sam2 import tiny_meta_sam2_config
    from maskport.testing.tokenizers import qwen_special_ids

    imports = _start([sys.executable, "-c", _IMPORTS])  # measured while the inputs are being written
    ids = qwen_special_ids()
    entry = dict(CI_ENTRY, ids=dict(bos=ids["<|endoftext|>"], eos=ids["<|im_end|>"], image=ids["<|image_pad|>"],
                                    video=ids["<|video_pad|>"], vision_start=ids["<|vision_start|>"],
                                    vision_end=ids["<|vision_end|>"]))
    files = generate.generate_set(tmp_path / "in", entry, sam2_model_cfg=tiny_meta_sam2_config()["model"],
                                  tokenizer="tiny")
    in_bytes = sum(json.loads((tmp_path / "in" / "GENERATED.json").read_text())["bytes"].values())
    assert 450e6 < in_bytes < 650e6, in_bytes

    import_rss = _peak_rss_kib(imports) * 1024
    out = tmp_path / "out"
    conv_rss = _peak_rss_kib(_start([sys.executable, "-m", "maskport.cli", "convert", "mmengine-to-hf",
                                     str(files["ckpt"]), "--base", str(files["base"]), "--sam2", str(files["sam2"]),
                                     "-o", str(out), "--no-progress"])) * 1024
    rep = json.loads((out / "conversion_report.json").read_text())
    out_bytes = sum(s["bytes"] for s in rep["shards"])
    assert out_bytes > 0.6 * in_bytes  # the conversion really moved the data
    bound = import_rss + 0.4 * in_bytes
    msg = (f"conversion peak RSS {conv_rss / 1e6:.0f} MB; imports alone {import_rss / 1e6:.0f} MB; input "
           f"{in_bytes / 1e6:.0f} MB; bound {bound / 1e6:.0f} MB")
    print(msg)
    assert conv_rss < bound, msg
