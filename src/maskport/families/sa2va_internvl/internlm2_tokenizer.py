"""InternLM2's tokenizer without remote code.

InternLM2 / InternLM2.5 folders (and the InternVL2.5-8B/26B and Sa2VA-8B/26B folders built on them) ship a
SentencePiece ``tokenizer.model`` and ``tokenization_internlm2.py``, which transformers loads only with
``trust_remote_code=True``. maskport never runs a folder's code, so the tokenizer is rebuilt as a plain
``PreTrainedTokenizerFast`` that current transformers loads by itself:

1. ``tokenizer.json`` present (a fast tokenizer saved earlier): loaded as it is;
2. otherwise ``tokenizer.model``: rebuilt by :func:`from_sentencepiece` as a ``tokenizers`` pipeline that
   encodes like InternLM2's own tokenizer (a byte-fallback SentencePiece BPE called on each piece of text between
   added tokens); reading the model file needs the ``sentencepiece`` and ``protobuf`` packages.

The special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``added_tokens.json``;
BOS is added by the export's ``predict_forward`` itself (``config.add_bos_token``), not by the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import MissingInput, UnreadableFile


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
        tok = PreTrainedTokenizerFast(tokenizer_object=from_sentencepiece(base_dir / "tokenizer.model"), **specials)
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
    for i, v in decoder.items():  # the ids the folder's tokenizer gives its added tokens must not move
        if isinstance(v, dict) and v.get("content") and tok.convert_tokens_to_ids(v["content"]) != int(i):
            raise UnreadableFile(f"{base_dir}: added token {v['content']!r} would get id "
                                 f"{tok.convert_tokens_to_ids(v['content'])}, the folder says {i}")
    tok.padding_side = cfg.get("padding_side", "right")
    return tok


def from_sentencepiece(model_file: str | Path):
    """A ``tokenizers.Tokenizer`` that encodes like InternLM2's remote-code tokenizer, built from its SentencePiece
    BPE model alone.

    InternLM2's tokenizer (a copy of transformers' older Llama tokenizer) splits the text on its added tokens and
    runs ``sp_model.encode`` on each remaining piece. ``tokenizers`` does the same: added tokens are split off
    first, then the normalizer and model run on each piece. SentencePiece's steps map one to one: its
    normalisation table (``Precompiled``), ``remove_extra_whitespaces`` (strip, collapse runs of spaces),
    ``add_dummy_prefix`` (``Prepend("▁")``), spaces -> ``▁``, then BPE with byte fallback. Merges are recovered
    from the pieces' scores (higher score = earlier merge). Control and user-defined pieces become added tokens."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise MissingInput(f"{model_file}: reading InternLM2's SentencePiece tokenizer.model needs the sentencepiece "
                           "and protobuf packages: pip install sentencepiece protobuf") from None
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as exc:  # noqa: BLE001 - re-raised typed
        raise UnreadableFile(f"{model_file}: not a SentencePiece model ({exc})") from exc
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise UnreadableFile(f"{model_file}: a SentencePiece model of type {proto.trainer_spec.model_type}; "
                             "InternLM2's is BPE (type 2)")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, pieces)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                               byte_fallback=proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    # 1 = normal, 2 = unknown, 3 = control (<s>, </s>), 4 = user defined, 6 = byte
    added = [AddedToken(p.piece, special=p.type == 3, normalized=False) for p in proto.pieces if p.type in (3, 4)]
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    return tok
