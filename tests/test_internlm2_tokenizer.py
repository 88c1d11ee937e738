"""InternLM2's SentencePiece tokenizer rebuilt without remote code (``internlm2_tokenizer.from_sentencepiece``),
against the reference behaviour of InternLM2's own tokenizer: split the text on the added tokens, then
``sentencepiece``'s own ``encode`` on each piece (the oracle is the sentencepiece library itself)."""

from __future__ import annotations

import io
import json
import re

import pytest

spm = pytest.importorskip("sentencepiece")

SPECIAL = ["<|im_start|>", "<|im_end|>"]
TEXTS = [
    "hello world", " leading space", "two  spaces and trailing ", "Red cat, blue dog.\nNew line\n\n123 45",
    "<|im_start|>user\nPlease segment the red cat.<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b",
    "accents é ü and 漢字 fall back to bytes", "x", "",
]


def _train(tmp_path, **kw):
    from maskport.testing.tokenizers import WORDS

    corpus = [f"{w} {WORDS[(i * 7) % len(WORDS)]} {w.capitalize()}, {w}.\n" for i, w in enumerate(WORDS)] * 3
    corpus.append("0 1 2 3 4 5 6 7 8 9 ? ! : ; ' \" ( ) [ ] < > / - _")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, split_digits=True, user_defined_symbols=SPECIAL,
                                   minloglevel=2, **kw)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path, spm.SentencePieceProcessor(model_proto=buf.getvalue())


def _reference(sp, text):
    ids = []
    for part in re.split("(" + "|".join(re.escape(t) for t in SPECIAL) + ")", text):
        if part in SPECIAL:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids += sp.encode(part)
    return ids


@pytest.mark.parametrize("kw", [
    # InternLM2's settings: no normalisation (newlines and runs of spaces survive), a dummy prefix
    dict(normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False),
    # SentencePiece's defaults: NFKC table, whitespace collapsed
    dict(normalization_rule_name="nmt_nfkc", add_dummy_prefix=True, remove_extra_whitespaces=True),
    dict(normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False),
], ids=["internlm2", "nfkc-collapse", "no-prefix"])
def test_encodes_like_sentencepiece_per_piece(tmp_path, kw):
    from transformers import PreTrainedTokenizerFast

    from maskport.families.sa2va_internvl.internlm2_tokenizer import from_sentencepiece

    path, sp = _train(tmp_path, **kw)
    tok = PreTrainedTokenizerFast(tokenizer_object=from_sentencepiece(path))
    assert len(tok) == sp.get_piece_size()
    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == _reference(sp, text), text
    if kw["normalization_rule_name"] == "identity":
        for text in TEXTS:
            if kw["add_dummy_prefix"] and text.startswith(" "):
                continue  # SentencePiece's decode drops the dummy prefix's space, and so one leading space
            assert tok.decode(_reference(sp, text)) == sp.decode(_reference(sp, text)) or SPECIAL[0] in text


def test_load_reads_tokenizer_model_and_special_tokens(tmp_path):
    from maskport.families.sa2va_internvl import internlm2_tokenizer

    _train(tmp_path, normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": {"500": {"content": "<IMG_CONTEXT>", "special": True}}}))
    (tmp_path / "tokenization_internlm2.py").write_text("raise RuntimeError('remote code must never run')\n")
    tok = internlm2_tokenizer.load(tmp_path)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 500
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert again("<|im_start|>user\nhi", add_special_tokens=False)["input_ids"] == tok(
        "<|im_start|>user\nhi", add_special_tokens=False)["input_ids"]


def test_a_missing_tokenizer_is_a_clear_error(tmp_path):
    from maskport.errors import MissingInput
    from maskport.families.sa2va_internvl import internlm2_tokenizer

    with pytest.raises(MissingInput, match="no tokenizer.json or tokenizer.model"):
        internlm2_tokenizer.load(tmp_path)
