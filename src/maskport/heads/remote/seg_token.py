"""The ``[SEG]`` half of maskport exports' ``predict_forward``: argument checks, greedy generation that keeps the
hidden states, the ``[SEG]`` hidden states picked out of them, projected by ``text_hidden_fcs`` and handed to the
model's mask head (``masks_from_prompts``, e.g. from ``sam2_image``).

Copied verbatim into every export folder whose family uses it (``FamilySpec.heads``); it may import only torch,
numpy, PIL and its sibling ``image_utils``.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .image_utils import as_pil, module_device_dtype

VIDEO_UNSUPPORTED = "video input is not supported by this export; pass frames one by one as images"
MASK_PROMPTS_UNSUPPORTED = ("mask_prompts (visual prompts, <vp>) are not supported by this export yet; "
                            "describe the region in text instead")


def select_seg_hidden_states(hidden_states, sequences: torch.Tensor, prompt_length: int,
                             seg_token_id: int, row: int = 0, end: int | None = None) -> torch.Tensor:
    """Last-layer hidden states of the ``[SEG]`` tokens the model generated, one row per ``[SEG]``.

    ``hidden_states`` is ``generate(..., output_hidden_states=True, return_dict_in_generate=True).hidden_states``:
    a tuple over generation steps; step 0 holds the prompt (``[B, prompt_length, C]`` per layer), each later
    step the one token fed back (``[B, 1, C]``); in each step the last entry is the last layer (after the final
    norm). Concatenating the last layer of every step gives one row per token *fed to the model*: the prompt
    and every generated token except the last one (which is never fed back). Row ``i`` is therefore the hidden
    state of input token ``sequences[0, i]`` -- the hidden state "at" that token, as Sa2VA trains with
    (``hidden_states[-1][input_ids == seg_id]``) and as its HF code picks at inference
    (``get_seg_hidden_states(cat(last layers), sequences[0][:-1], seg_id)``).

    Differences from Sa2VA's Qwen code, both deliberate:

    - only generated positions count: Sa2VA's mask covers the prompt too, so a literal ``[SEG]`` in the user
      text would produce an extra mask that matches no ``[SEG]`` of the answer;
    - a ``[SEG]`` generated as the very last token (the ``max_new_tokens`` cut-off) has no hidden state, since
      it was never fed back; like Sa2VA we drop it, so the answer then shows one ``[SEG]`` more than there are
      masks.

    ``row``: the batch element to read (a batch is left-padded, so every row's prompt ends at ``prompt_length``);
    ``end``: only positions before it count (a row of a batch that finished earlier is padded after its stop
    token).
    """
    if not hidden_states:
        return sequences.new_zeros((0, 0), dtype=torch.float32)
    last = torch.cat([step[-1][row] for step in hidden_states], dim=0)  # [n_fed, C]
    fed_ids = sequences[row, : last.shape[0]].to(last.device)
    is_seg = fed_ids == seg_token_id
    is_seg[: min(prompt_length, is_seg.shape[0])] = False
    if end is not None:
        is_seg[end:] = False
    return last[is_seg]


class SegTokenMixin:
    """For a model with ``self.mllm`` (a transformers generative VLM), ``self.text_hidden_fcs``, a mask head mixin
    (``masks_from_prompts``) and a config with ``seg_token``, ``seg_token_id``, ``mask_threshold``,
    ``max_new_tokens`` and ``template['stop_words']``.

    Batched prediction (:meth:`predict_batch`, or ``predict_forward`` with lists) needs two methods of the model:
    ``prompt_inputs(image, text, past_text, tokenizer, processor) -> (token ids, MLLM image inputs)`` for one
    sample, and ``concat_mm_inputs(list of those inputs) -> one dict`` for the batch."""

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs the MLLM needs beside the (left-padded) prompt ids, e.g. Qwen3-VL's
        ``mm_token_type_ids``; none by default."""
        return {}

    def check_predict_inputs(self, image, video, text, mask_prompts, tokenizer, processor):
        """``predict_forward``'s argument checks, shared by the families: returns (image as PIL or None, tokenizer)."""
        if video is not None:
            if image is not None:
                raise ValueError("pass either image= or video=, not both")
            if not (hasattr(self, "video_prompt_inputs") and hasattr(self, "video_masks_from_prompts")):
                raise NotImplementedError(VIDEO_UNSUPPORTED)
        if mask_prompts is not None:  # a family may explain why (``mask_prompts_unsupported``)
            raise NotImplementedError(getattr(self, "mask_prompts_unsupported", MASK_PROMPTS_UNSUPPORTED))
        if text is None:
            raise ValueError("text is required")
        if tokenizer is None and processor is not None:
            tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("pass tokenizer= (AutoTokenizer.from_pretrained(export_dir)) or processor=")
        return (as_pil(image) if image is not None else None), tokenizer

    def generate_and_segment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm: dict, tokenizer,
                             image, mask_threshold=None, max_new_tokens=None, generation_kwargs=None,
                             return_probabilities: bool = False, segment=None) -> dict[str, Any]:
        """Steps 3-4 of ``predict_forward``: greedy ``self.mllm.generate`` (stop on the template's stop words;
        ``generation_kwargs`` override the defaults, except the hidden-state settings the masks need), the answer
        decoded with special tokens kept, then :meth:`masks_from_generation` when there is an image (or
        ``segment(embeddings [N, D], threshold) -> masks`` when given: the video path)."""
        threshold = self.config.mask_threshold if mask_threshold is None else float(mask_threshold)
        max_new = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        stop_ids = self.stop_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
        gen_kwargs = dict(max_new_tokens=max_new, do_sample=False, num_beams=1,
                          eos_token_id=stop_ids or None, pad_token_id=pad_id, use_cache=True)
        gen_kwargs.update(generation_kwargs or {})
        gen_kwargs.update(output_hidden_states=True, return_dict_in_generate=True)
        out = self.mllm.generate(input_ids=input_ids, attention_mask=attention_mask, **mm,
                                 **self.token_inputs(input_ids), **gen_kwargs)
        prompt_length = input_ids.shape[1]
        prediction = tokenizer.decode(out.sequences[0, prompt_length:], skip_special_tokens=False).strip()
        result: dict[str, Any] = {"prediction": prediction, "prediction_masks": []}
        if return_probabilities:
            result["prediction_probabilities"] = []
        if image is None and segment is None:
            return result
        masks, probs = self.masks_from_generation(out, prompt_length, image, tokenizer, threshold,
                                                  return_probabilities, segment=segment)
        result["prediction_masks"] = masks
        if return_probabilities:
            result["prediction_probabilities"] = probs
        return result

    def predict_batch(self, images, texts, tokenizer=None, processor=None, past_texts=None, mask_threshold=None,
                      return_probabilities: bool = False, max_new_tokens=None, generation_kwargs=None) -> list:
        """``predict_forward`` for several samples at once: one greedy ``generate`` over the batch (prompts
        left-padded), then the mask head per sample. Returns one result dict per sample, as ``predict_forward``
        gives it; an entry of ``images`` may be ``None`` (text only).

        Each answer is cut after its first stop token (a row that finished early is padded after it, which one
        sample alone never sees); ``[SEG]`` hidden states are read per row. Padding changes the shapes the kernels
        see, so logits can differ from one-by-one prediction in the last bits of floating point: answers and masks
        are the same unless a greedy choice or a mask pixel sits on such a tie."""
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        past_texts = [""] * len(texts) if past_texts is None else list(past_texts)
        if len(past_texts) != len(texts):
            raise ValueError(f"{len(past_texts)} past_texts for {len(texts)} texts")
        if not texts:
            return []
        rows = []
        for image, text, past in zip(images, texts, past_texts):
            image, tokenizer = self.check_predict_inputs(image, None, text, None, tokenizer, processor)
            ids, mm = self.prompt_inputs(image, text, past or "", tokenizer, processor)
            rows.append((image, list(ids), mm))
        device, _ = module_device_dtype(self.mllm)
        threshold = self.config.mask_threshold if mask_threshold is None else float(mask_threshold)
        max_new = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        stop_ids = self.stop_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
        width = max(len(ids) for _, ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, ids, _) in enumerate(rows):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids):] = 1
        mms = [mm for _, _, mm in rows if mm]
        mm = {k: v.to(device) for k, v in self.concat_mm_inputs(mms).items()} if mms else {}
        gen_kwargs = dict(max_new_tokens=max_new, do_sample=False, num_beams=1,
                          eos_token_id=stop_ids or None, pad_token_id=pad_id, use_cache=True)
        gen_kwargs.update(generation_kwargs or {})
        gen_kwargs.update(output_hidden_states=True, return_dict_in_generate=True)
        input_ids = input_ids.to(device)
        out = self.mllm.generate(input_ids=input_ids, attention_mask=attention_mask.to(device), **mm,
                                 **self.token_inputs(input_ids), **gen_kwargs)
        results = []
        for i, (image, _, _) in enumerate(rows):
            generated = out.sequences[i, width:].tolist()
            cut = next((j + 1 for j, t in enumerate(generated) if t in stop_ids), len(generated))
            result: dict[str, Any] = {
                "prediction": tokenizer.decode(generated[:cut], skip_special_tokens=False).strip(),
                "prediction_masks": []}
            if return_probabilities:
                result["prediction_probabilities"] = []
            if image is not None:
                seg_hidden = select_seg_hidden_states(out.hidden_states, out.sequences, width,
                                                      self.seg_token_id(tokenizer), row=i, end=width + cut)
                if seg_hidden.shape[0]:
                    fcs_device, fcs_dtype = module_device_dtype(self.text_hidden_fcs)
                    emb = self.text_hidden_fcs(seg_hidden.to(device=fcs_device, dtype=fcs_dtype))
                    masks, probs = self.masks_from_prompts(image, emb, threshold, return_probabilities)
                    result["prediction_masks"] = masks
                    if return_probabilities:
                        result["prediction_probabilities"] = probs
            results.append(result)
        return results

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = []
        for word in self.config.template.get("stop_words") or []:
            tid = tokenizer.convert_tokens_to_ids(word)
            if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        if not ids and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids

    def seg_token_id(self, tokenizer) -> int:
        tid = tokenizer.convert_tokens_to_ids(self.config.seg_token)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            if self.config.seg_token_id is not None and tid != self.config.seg_token_id:
                raise ValueError(f"the tokenizer maps {self.config.seg_token} to {tid} but the model was exported "
                                 f"with seg_token_id={self.config.seg_token_id}: wrong tokenizer?")
            return tid
        if self.config.seg_token_id is not None:
            return int(self.config.seg_token_id)
        raise ValueError(f"the tokenizer does not know {self.config.seg_token}")

    def masks_from_generation(self, out, prompt_length: int, image: Image.Image, tokenizer, threshold: float,
                              return_probabilities: bool, segment=None) -> tuple[list, list]:
        """Steps 3-4 of ``predict_forward`` after ``generate``: ``[SEG]`` hidden states -> ``text_hidden_fcs`` ->
        the mask head's :meth:`masks_from_prompts` (e.g. ``sam2_image``). Returns (masks, probabilities), each a
        list of ``(1, H, W)`` arrays."""
        seg_hidden = select_seg_hidden_states(out.hidden_states, out.sequences, prompt_length,
                                              self.seg_token_id(tokenizer))
        if seg_hidden.shape[0] == 0:
            return [], []
        fcs_device, fcs_dtype = module_device_dtype(self.text_hidden_fcs)
        seg_embeddings = self.text_hidden_fcs(seg_hidden.to(device=fcs_device, dtype=fcs_dtype))
        if segment is not None:
            return segment(seg_embeddings, threshold), []
        return self.masks_from_prompts(image, seg_embeddings, threshold, return_probabilities)

    def predict_video(self, video, text: str, past_text: str = "", tokenizer=None, processor=None,
                      key_frames: str = "official", num_key_frames: int | None = None, mask_threshold=None,
                      max_new_tokens=None, generation_kwargs=None) -> dict[str, Any]:
        """``predict_forward(video=...)``: the key frames (``key_frames='official'``: the first 5, as Sa2VA's
        released code; ``'uniform'``: ``num_key_frames`` spread over the video) go through the MLLM as the family
        builds a multi-frame prompt (``video_prompt_inputs``); each generated ``[SEG]``'s embedding prompts SAM2 on
        every key frame and the masks are propagated through all frames, streamed (``video_masks_from_prompts``).
        Returns ``{"prediction": str, "prediction_masks": [np.bool_ (T, H, W) per [SEG]]}``."""
        frames = self.open_video(video)
        indices = self.video_key_frames(len(frames), key_frames, num_key_frames)
        key_images = frames.take(indices)
        ids, mm = self.video_prompt_inputs([key_images[i] for i in indices], text, past_text, tokenizer, processor)
        device, _ = module_device_dtype(self.mllm)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        mm = {k: v.to(device) for k, v in mm.items()}

        def segment(embeddings, threshold):
            return self.video_masks_from_prompts(frames, len(frames), key_images, embeddings, threshold)

        return self.generate_and_segment(input_ids, torch.ones_like(input_ids), mm, tokenizer, None, mask_threshold,
                                         max_new_tokens, generation_kwargs, False, segment=segment)


__all__ = ["MASK_PROMPTS_UNSUPPORTED", "SegTokenMixin", "VIDEO_UNSUPPORTED", "select_seg_hidden_states"]
