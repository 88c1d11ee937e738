"""Sample sets: what verify, quantize calibration and the demo read.

JSONL format (one object per line; paths relative to the JSONL file):
    {"image": "images/0001.png", "prompt": "<image>Please segment the red circle.", "gt_mask": "masks/0001.png"}
``gt_mask`` is optional (a PNG whose non-zero pixels are the object); ``id`` is optional (default: line number);
``answer`` is optional (a reference answer, e.g. "Sure, [SEG].", used for calibration).

Also: ``load_image_folder`` (every image of a folder, one prompt for all, no GT) and ``load_refcoco`` (RefCOCO /
RefCOCO+ / RefCOCOg: the refs file, pickle or JSON, plus COCO ``instances.json`` with polygon or RLE
segmentations; one sample per referring sentence). ``load_samples`` picks one of the three from a path.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingInput, UnreadableFile
from ..io.jsonfile import JsonError, loads_bounded, read_json_file


DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
"""The largest image (width x height) decoded by default: 40 megapixels (e.g. 7700 x 5200); ``--max-image-pixels``
(or the ``MASKPORT_MAX_IMAGE_PIXELS`` environment variable, which the option sets for worker processes too) raises
it. The size is read from the file's header and checked before any pixel is decoded: a small compressed file
cannot expand into gigabytes."""

SAMPLES_MAX_BYTES = 256 << 20
"""The largest JSONL sample file / COCO instances file read."""


def max_image_pixels() -> int:
    v = os.environ.get("MASKPORT_MAX_IMAGE_PIXELS")
    try:
        return int(v) if v else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        return DEFAULT_MAX_IMAGE_PIXELS


def open_image(path: Path, what: str = "image"):
    """``PIL.Image.open`` of an input image with its size checked against :func:`max_image_pixels` before anything
    is decoded; :class:`UnreadableFile` naming the file for an unreadable or too large image."""
    import warnings

    from PIL import Image

    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # the limit is checked below, before decoding, with our message
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except Image.DecompressionBombError as exc:
        raise UnreadableFile(f"{what} {path}: {exc}; pass --max-image-pixels to raise the limit "
                             f"({limit} pixels)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableFile(f"{what} {path}: not a readable image ({exc})") from None
    w, h = im.size
    if w * h > limit:
        im.close()
        raise UnreadableFile(f"{what} {path} is {w} x {h} = {w * h} pixels, above the limit of {limit}; pass "
                             f"--max-image-pixels to raise it")
    return im


def _decode(path: Path, mode: str, what: str):
    im = open_image(path, what)
    try:
        with im:
            return im.convert(mode)
    except MemoryError:
        w, h = im.size
        raise UnreadableFile(f"{what} {path}: cannot be decoded (out of memory for {w} x {h} pixels; lower "
                             f"--max-image-pixels)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableFile(f"{what} {path}: cannot be decoded ({exc})") from None


@dataclass
class Sample:
    id: str
    image_path: Path
    prompt: str
    gt_mask_path: Path | None = None
    answer: str | None = None
    # RefCOCO-style GT: COCO segmentations (polygons or RLE) whose union is the object, and the image's (h, w)
    gt_segmentations: list[Any] | None = None
    gt_size: tuple[int, int] | None = None

    @property
    def has_gt(self) -> bool:
        return self.gt_mask_path is not None or self.gt_segmentations is not None

    def image(self):
        return _decode(self.image_path, "RGB", f"sample {self.id}: image")

    def gt_mask(self) -> np.ndarray | None:
        if self.gt_segmentations is not None:
            from .coco import segmentation_to_mask

            h, w = self.gt_size
            out = np.zeros((h, w), dtype=bool)
            for seg in self.gt_segmentations:
                out |= segmentation_to_mask(seg, h, w)
            return out
        if self.gt_mask_path is None:
            return None
        return np.asarray(_decode(self.gt_mask_path, "L", f"sample {self.id}: gt_mask")) > 0


def load_jsonl(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"sample file {path} does not exist")
    root = path.parent
    out: list[Sample] = []
    size = path.stat().st_size
    if size > SAMPLES_MAX_BYTES:
        raise UnreadableFile(f"sample file {path}: {size} bytes, more than the {SAMPLES_MAX_BYTES} accepted")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"sample file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = loads_bounded(line, max_depth=8)
        except JsonError as exc:
            raise UnreadableFile(f"{path}:{n}: {exc}") from None
        if not isinstance(rec, dict) or "image" not in rec or "prompt" not in rec:
            raise UnreadableFile(f"{path}:{n}: each line needs 'image' and 'prompt'")
        for key, types in (("image", (str,)), ("prompt", (str,)), ("gt_mask", (str, type(None))),
                           ("answer", (str, type(None))), ("id", (str, int, type(None)))):
            if key in rec and (not isinstance(rec[key], types) or isinstance(rec[key], bool)):
                raise UnreadableFile(f"{path}:{n}: field {key!r} should be "
                                     f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}, "
                                     f"found {type(rec[key]).__name__}")
        for key in ("image", "gt_mask"):
            if isinstance(rec.get(key), str) and (not rec[key] or "\x00" in rec[key]):
                raise UnreadableFile(f"{path}:{n}: field {key!r} is not a file name")
        img = root / rec["image"]
        if not img.is_file():
            raise MissingInput(f"{path}:{n}: image {img} does not exist (or is not a regular file)")
        gt = root / rec["gt_mask"] if rec.get("gt_mask") else None
        if gt is not None and not gt.is_file():
            raise MissingInput(f"{path}:{n}: gt_mask {gt} does not exist (or is not a regular file)")
        out.append(Sample(str(rec.get("id", n)), img, rec["prompt"], gt, rec.get("answer")))
    if not out:
        raise UnreadableFile(f"{path}: no samples")
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def load_image_folder(folder: str | Path, prompt: str) -> list[Sample]:
    """Every image directly in ``folder`` (sorted by name), each with the same ``prompt``; no GT."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"image folder {folder} does not exist")
    if not prompt or not prompt.strip():
        raise MissingInput(f"{folder} is a folder of images: give the prompt for all of them with --prompt")
    if "<image>" not in prompt:
        prompt = "<image>" + prompt
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UnreadableFile(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Sample(p.name, p, prompt) for p in images]


class _NoGlobalsUnpickler(pickle.Unpickler):
    """RefCOCO's refs(*).p holds only dicts, lists, strings and numbers: refuse anything that names code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refs pickle asks for {module}.{name}; only plain data is allowed")


def _read_refs(path: Path) -> list[dict]:
    try:
        if path.suffix.lower() == ".json":
            refs = read_json_file(path, expect=None, what="refs file", max_bytes=SAMPLES_MAX_BYTES)
        else:
            with path.open("rb") as f:
                refs = _NoGlobalsUnpickler(f, encoding="latin1").load()
    except (OSError, ValueError, pickle.UnpicklingError, EOFError, IndexError, TypeError, KeyError,
            AttributeError, RecursionError, MemoryError, UnicodeDecodeError) as exc:
        raise UnreadableFile(f"refs file {path}: not a plain-data refs pickle ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
    if isinstance(refs, dict) and "refs" in refs:
        refs = refs["refs"]
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise UnreadableFile(f"refs file {path}: expected a list of refs (dicts with image_id, ann_id, sentences)")
    return refs


DEFAULT_REFCOCO_PROMPT = "<image>Please segment {sentence}."


def load_refcoco(refs: str | Path, instances: str | Path, image_root: str | Path, split: str | None = "val",
                 prompt_template: str = DEFAULT_REFCOCO_PROMPT, limit: int | None = None) -> list[Sample]:
    """RefCOCO-style evaluation set: one sample per referring sentence of each ref in ``split``.

    ``refs``: the refs file (``refs(unc).p`` pickle -- read as plain data only -- or the same list as JSON);
    each ref has ``image_id``, ``ann_id`` (an int, or a list whose union is the target), ``split`` and
    ``sentences`` (``[{"sent": ...}, ...]``). ``instances``: COCO ``instances.json`` (``images`` with
    ``file_name``/``height``/``width``; ``annotations`` with ``segmentation`` as polygons or RLE).
    ``image_root``: the folder holding the images' ``file_name``. ``prompt_template`` is formatted with
    ``sentence``. ``split=None`` takes every ref. Sample ids are ``<ref_id>:<sentence index>``.
    """
    refs, instances, image_root = Path(refs), Path(instances), Path(image_root)
    for what, p in (("refs file", refs), ("instances file", instances)):
        if not p.is_file():
            raise MissingInput(f"{what} {p} does not exist")
    if not image_root.is_dir():
        raise MissingInput(f"image folder {image_root} does not exist")
    if "{sentence}" not in prompt_template:
        raise MissingInput("the RefCOCO prompt template must contain {sentence}")
    ref_list = _read_refs(refs)
    try:
        inst = read_json_file(instances, what="instances file", max_bytes=SAMPLES_MAX_BYTES)
        images = {int(im["id"]): im for im in inst["images"]}
        anns = {int(a["id"]): a for a in inst["annotations"]}
        for im in images.values():
            if not (isinstance(im.get("file_name"), str) and isinstance(im.get("height"), int)
                    and isinstance(im.get("width"), int) and 0 < im["height"] * im["width"] <= max_image_pixels()):
                raise ValueError(f"image {im.get('id')}: file_name/height/width missing, of the wrong type or "
                                 f"beyond the pixel limit")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise UnreadableFile(f"instances file {instances}: expected COCO json with images and annotations "
                             f"({type(exc).__name__}: {exc})") from exc
    out: list[Sample] = []
    for r in ref_list:
        if split is not None and r.get("split") != split:
            continue
        try:
            image = images[int(r["image_id"])]
            ann_ids = r["ann_id"] if isinstance(r["ann_id"], list) else [r["ann_id"]]
            segs = [anns[int(a)]["segmentation"] for a in ann_ids]
            sentences = [s["sent"] if isinstance(s, dict) else str(s) for s in r["sentences"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UnreadableFile(f"refs file {refs}: ref {r.get('ref_id', '?')} does not match {instances} "
                                 f"({type(exc).__name__}: {exc})") from exc
        img_path = image_root / image["file_name"]
        if not img_path.is_file():
            raise MissingInput(f"image {img_path} (ref {r.get('ref_id', '?')}) does not exist")
        size = (int(image["height"]), int(image["width"]))
        for k, sent in enumerate(sentences):
            out.append(Sample(f"{r.get('ref_id', len(out))}:{k}", img_path,
                              prompt_template.format(sentence=sent.strip()), gt_segmentations=segs, gt_size=size))
            if limit is not None and len(out) >= limit:
                return out
    if not out:
        raise UnreadableFile(f"refs file {refs}: no refs in split {split!r}")
    return out


def load_samples(path: str | Path, prompt: str | None = None, limit: int | None = None) -> list[Sample]:
    """A JSONL file (``load_jsonl``) or a folder of images with one ``prompt`` (``load_image_folder``)."""
    path = Path(path)
    if path.is_dir():
        samples = load_image_folder(path, prompt or "")
    elif path.is_file():
        samples = load_jsonl(path)
        if prompt:
            raise MissingInput("--prompt is for a folder of images; a JSONL file has a prompt on each line")
    else:
        raise MissingInput(f"samples {path} does not exist (a JSONL file, or a folder of images with --prompt)")
    return samples[:limit] if limit is not None else samples
