"""Issue 20, item 7: an export never names tokenizer code it does not hold (a base folder's remote-code
``auto_map``), so ``AutoTokenizer.from_pretrained(export, trust_remote_code=True)`` loads with the export's files."""

from __future__ import annotations

import json
import shutil


def test_base_tokenizer_auto_map_is_not_carried_into_the_export(fx, tmp_path):
    from transformers import AutoTokenizer

    from maskport.convert.api import convert_mmengine_to_hf

    base = tmp_path / "base"
    shutil.copytree(fx.base_dir, base)
    tc = json.loads((base / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_remote.RemoteTokenizer", None]}
    (base / "tokenizer_config.json").write_text(json.dumps(tc))
    # precondition: transformers itself carries the entry over when the base tokenizer is saved again
    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    tok.save_pretrained(tmp_path / "resaved")
    assert "auto_map" in json.loads((tmp_path / "resaved" / "tokenizer_config.json").read_text())

    out = tmp_path / "export"
    convert_mmengine_to_hf(fx.ckpt, base=base, sam2=fx.sam2_pt, out=out, progress=False)
    exported = json.loads((out / "tokenizer_config.json").read_text())
    assert "tokenization_remote" not in json.dumps(exported.get("auto_map", {}))
    loaded = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert loaded.convert_tokens_to_ids("[SEG]") != loaded.unk_token_id


def test_drop_foreign_auto_map_keeps_entries_whose_code_is_present(tmp_path):
    from maskport.families._common import drop_foreign_auto_map

    (tmp_path / "tokenization_mine.py").write_text("# shipped with the export\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {
        "AutoTokenizer": ["tokenization_mine.MyTokenizer", None],
        "AutoProcessor": "processing_remote.RemoteProcessor",
        "AutoImageProcessor": "someone/repo--image_processing.X"}}))
    assert sorted(drop_foreign_auto_map(tmp_path)) == ["AutoImageProcessor", "AutoProcessor"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["auto_map"] == {
        "AutoTokenizer": ["tokenization_mine.MyTokenizer", None]}
