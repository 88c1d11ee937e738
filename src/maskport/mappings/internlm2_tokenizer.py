"""InternLM2's tokenizer without remote code.

InternLM2 / InternLM2.5 folders (and the InternVL2.5-8B/26B and Sa2VA-8B/26B folders built on them) ship a
SentencePiece ``tokenizer.model`` and ``tokenization_internlm2.py``, which transformers loads only with
``trust_remote_code=True``. maskport never runs a folder's code, so the tokenizer is rebuilt as a plain
``PreTrainedTokenizerFast`` that current transformers loads by itself:

1. ``tokenizer.json`` present (a fast tokenizer saved earlier): loaded as it is;
2. otherwise ``tokenizer.model``: converted with transformers' own SentencePiece converter for Llama-style
   (byte-fallback BPE) models, which InternLM2's tokenizer is; this needs the ``sentencepiece`` package
   (``pip install sentencepiece``).

The special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``added_tokens.json``;
BOS is added by the export's ``predict_forward`` itself (``config.add_bos_token``), not by the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MissingInput, UnreadableFile


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise UnreadableFile(f"{path}: not valid JSON ({exc})") from exc


def _token(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load(base_dir: str | Path):
    """A ``PreTrainedTokenizerFast`` equivalent to the folder's InternLM2 tokenizer (see the module docstring)."""
    from transformers import PreTrainedTokenizerFast

    base_dir = Path(base_dir)
    cfg = _read(base_dir / "tokenizer_config.json")
    special_map = _read(base_dir / "special_tokens_map.json")
    specials = {k: _token(special_map.get(k, cfg.get(k))) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials = {k: v for k, v in specials.items() if v}
    if (base_dir / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(base_dir / "tokenizer.json"), **specials)
    elif (base_dir / "tokenizer.model").is_file():
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise MissingInput(f"{base_dir}: converting InternLM2's SentencePiece tokenizer.model needs the "
                               "sentencepiece package: pip install sentencepiece") from None
        from transformers.convert_slow_tokenizer import LlamaConverter

        class _Vocab:  # the minimal "slow tokenizer" the converter reads
            vocab_file = str(base_dir / "tokenizer.model")
            legacy = True
            add_prefix_space = None

        try:
            backend = LlamaConverter(_Vocab()).converted()
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{base_dir / 'tokenizer.model'}: cannot convert it ({exc})") from exc
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    else:
        raise MissingInput(f"{base_dir}: no tokenizer.json or tokenizer.model (an InternLM2 folder has one)")
    # tokens the folder added on top of the SentencePiece vocabulary (InternVL's <img>, <IMG_CONTEXT>, ...)
    added = _read(base_dir / "added_tokens.json")
    decoder = cfg.get("added_tokens_decoder") or {}
    extra = [t for t, _ in sorted(added.items(), key=lambda kv: kv[1])]
    extra += [v.get("content") for _, v in sorted(decoder.items(), key=lambda kv: int(kv[0]))
              if isinstance(v, dict) and v.get("content")]
    missing = [t for t in dict.fromkeys(extra) if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    tok.padding_side = cfg.get("padding_side", "right")
    return tok
