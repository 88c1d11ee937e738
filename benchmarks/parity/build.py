"""Build the inputs of the parity check (see README.md): a tiny Sa2VA-InternVL training run with a real-size SAM2,
maskport's export of it, and the released-format folder that Sa2VA's own HF code loads.

    PYTHONPATH=src .venv/bin/python benchmarks/parity/build.py OUT {qwen2|internlm2} --sa2va-repo PATH

OUT/export   maskport convert mmengine-to-hf of the training checkpoint (fp32, default options)
OUT/released what Sa2VA's HF export script writes for the same trained model (LoRA merged by peft), plus the
             model files of Sa2VA's repository (``projects/llava_sam2/hf/models``, copied from PATH at run time)
             and tokenizer files readable by the transformers 4.42 that code needs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("llm", choices=["qwen2", "internlm2"])
    ap.add_argument("--sa2va-repo", type=Path, required=True, help="a checkout of magic-research/Sa2VA")
    args = ap.parse_args()

    import sam2
    from omegaconf import OmegaConf

    import maskport.testing.sa2va_internvl as F
    from maskport.convert.api import convert_mmengine_to_hf

    # Sa2VA's HF SAM2 is hard-wired to hiera-large (SAM2 v1 config): build the fixture with that one
    yaml = Path(os.path.dirname(sam2.__file__)) / "configs/sam2/sam2_hiera_l.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(yaml), resolve=True)
    F.tiny_meta_sam2_config = lambda: {"model": cfg["model"]}
    root = args.out
    tok = F.make_internlm2_tokenizer_dir(root / "tok") if args.llm == "internlm2" else None
    fx = F.make_internvl_fixture(root / "fx", llm=args.llm, version="v2", tokenizer_dir=tok)
    (fx.sam2_pt.parent / "tiny_sam2.config.json").unlink()  # maskport detects the preset from the shapes
    res = convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=root / "export", progress=False,
                                 log=print, dtype="fp32")
    print("SAM2 preset:", res.report["settings"]["sam2_preset"])

    released = F.make_released_folder(fx, root / "released")
    for f in (args.sa2va_repo / "projects/llava_sam2/hf/models").iterdir():
        shutil.copy(f, released / f.name)
    tc = json.loads((released / "tokenizer_config.json").read_text())
    if args.llm == "internlm2":  # their slow InternLM2Tokenizer reads the SentencePiece model
        shutil.copy(root / "tok" / "tokenizer.model", released / "tokenizer.model")
    else:  # transformers 4.42 knows neither TokenizersBackend nor the newer merges format of tokenizer.json
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tj = json.loads((released / "tokenizer.json").read_text())
        merges = tj["model"].get("merges") or []
        tj["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
        (released / "tokenizer.json").write_text(json.dumps(tj))
    (released / "tokenizer_config.json").write_text(json.dumps(tc))
    print("wrote", root / "export", "and", released)


if __name__ == "__main__":
    main()
