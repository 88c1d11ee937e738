"""Tiny, offline tokenizers for the fixtures, trained deterministically on a small English corpus.

* :func:`make_tiny_tokenizer`: a byte-level BPE (~450 tokens) with Qwen2.5's special tokens and a Qwen chat template
  (the Sa2VA-Qwen2.5-VL fixture's base tokenizer; the Sa2VA-InternVL Qwen2 fixture adds InternVL's tokens to it).
* :func:`make_internlm2_tokenizer_dir`: a SentencePiece folder laid out like InternLM2's (InternVL2.5-8B).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

# Qwen2.5's special tokens, in Qwen's own id order (they sit after the BPE vocab, like in Qwen).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


WORDS = """
the a an and or but of to in on at by for with from into over under above below near behind
this that these those it its is are was were be been has have had do does did not no yes
please segment describe find show mark region object image picture video frame mask sure here
what where which who how why can could would should will may might there their they them
cat dog person man woman child boy girl car bus truck bike bicycle horse cow sheep bird tree
house table chair sofa bed cup bottle phone laptop book clock vase plant window door road sky
left right top bottom middle center front back small large big little red green blue yellow
black white brown gray orange pink purple dark light bright old new young tall short long round
sitting standing walking running holding wearing looking eating playing lying riding carrying
one two three four five six seven eight nine ten first second third last next other another
answer question assistant user system you your i me my we our he she his her him
""".split()



# InternVL's image/box tokens, as InternVL's tokenizers add them after the base vocabulary.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


# --------------------------------------------------------------------------------------------------
# byte-level BPE with Qwen's special tokens
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _raw_tokenizer_json() -> str:
    """Train (deterministically) a tiny byte-level BPE and append Qwen's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=448,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = []
    for i, w in enumerate(WORDS):
        corpus.append(f"{w} {WORDS[(i * 7) % len(WORDS)]} {w.capitalize()}, {w}.\n")
    corpus.append("0 1 2 3 4 5 6 7 8 9 ? ! : ; ' \" ( ) [ ] < > / - _ \n")
    tok.train_from_iterator(corpus * 3, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tok.to_str()


def qwen_special_ids() -> dict[str, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_raw_tokenizer_json())
    return {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}


def make_tiny_tokenizer(root) -> Any:
    """Offline byte-level BPE tokenizer (~450 tokens) with Qwen's special tokens; saved in ``root``.

    ``AutoTokenizer.from_pretrained(root)`` works offline afterwards.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_raw_tokenizer_json()),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
        padding_side="right",
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tok.save_pretrained(str(root))
    return tok


# --------------------------------------------------------------------------------------------------
# InternLM2 (SentencePiece)
# --------------------------------------------------------------------------------------------------
def make_internlm2_tokenizer_dir(root: Path) -> Path:
    """A folder laid out like InternLM2's tokenizer as InternVL2.5-8B ships it: a SentencePiece BPE
    ``tokenizer.model`` (byte fallback, no normalisation, dummy prefix, the chat tokens as user-defined pieces;
    trained here on the tiny corpus), ``tokenizer_config.json`` naming the remote-code ``InternLM2Tokenizer`` (which
    maskport must not run) and InternVL's image tokens as added tokens after the SentencePiece vocabulary."""
    import io

    import sentencepiece as spm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus = [f"{w} {WORDS[(i * 7) % len(WORDS)]} {w.capitalize()}, {w}.\n" for i, w in enumerate(WORDS)] * 3
    corpus.append("0 1 2 3 4 5 6 7 8 9 ? ! : ; ' \" ( ) [ ] < > / - _")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=500, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, split_digits=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   normalization_rule_name="identity", add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, minloglevel=2)
    (root / "tokenizer.model").write_bytes(buf.getvalue())
    n = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(n + i): {"content": t, "special": True} for i, t in enumerate(INTERNVL_TOKENS)}}))
    (root / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
    (root / "tokenization_internlm2.py").write_text("raise RuntimeError('remote code must never run')\n")
    return root
