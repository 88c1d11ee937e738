"""A small Python client for ``maskport serve``: send an image + prompt, get the answer and the masks back as
boolean arrays (COCO RLE decoded by :mod:`maskport.rle`). Needs httpx (``pip install maskport[serve]``).

    from maskport.serve.client import segment, decode_masks
    res = segment("http://127.0.0.1:8000", "cat.png", "Please segment the cat.")
    masks = decode_masks(res)          # list of (H, W) bool arrays, one per [SEG] of res["prediction"]
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from .. import rle


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    buf = io.BytesIO()  # a PIL image
    image.save(buf, format="PNG")
    return buf.getvalue()


def segment(url: str, image: Any, prompt: str, *, api_key: str | None = None, threshold: float | None = None,
            max_new_tokens: int | None = None, return_probabilities: bool = False, timeout: float = 300.0,
            client=None) -> dict[str, Any]:
    """POST ``/v1/segment`` (multipart). ``image``: a path, bytes (PNG/JPEG/...), a PIL image or None (text only).
    Raises ``RuntimeError("HTTP <status>: <server's one-line reason>")`` on an error answer."""
    import httpx

    data: dict[str, str] = {"prompt": prompt}
    if threshold is not None:
        data["threshold"] = str(threshold)
    if max_new_tokens is not None:
        data["max_new_tokens"] = str(int(max_new_tokens))
    if return_probabilities:
        data["return_probabilities"] = "true"
    files = {"image": ("image", _image_bytes(image), "application/octet-stream")} if image is not None else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    own = client is None
    client = client or httpx.Client(timeout=timeout)
    try:
        r = client.post(url.rstrip("/") + "/v1/segment", data=data, files=files, headers=headers)
    finally:
        if own:
            client.close()
    try:
        body = r.json()
    except ValueError:
        body = {"error": r.text[:200]}
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {body.get('error', body)}")
    return body


def decode_masks(response: dict[str, Any]) -> list[np.ndarray]:
    """The response's masks as boolean ``(H, W)`` arrays, in ``seg_index`` order."""
    return [rle.decode({"size": m["size"], "counts": m["counts"]})
            for m in sorted(response.get("masks", []), key=lambda m: m["seg_index"])]


def decode_probabilities(response: dict[str, Any]) -> list[np.ndarray]:
    """The masks' probability maps (asked with ``return_probabilities=True``) as float32 ``(H, W)`` arrays."""
    out = []
    for m in sorted(response.get("masks", []), key=lambda m: m["seg_index"]):
        p = m.get("probabilities")
        if p is None:
            raise ValueError("the response has no probabilities: ask with return_probabilities=True")
        if p.get("dtype") != "float16":
            raise ValueError(f"unknown probability dtype {p.get('dtype')!r}")
        h, w = (int(v) for v in p["shape"])
        a = np.frombuffer(base64.b64decode(p["data"]), dtype="<f2")
        if a.size != h * w:
            raise ValueError(f"probabilities hold {a.size} values, expected {h} x {w}")
        out.append(a.reshape(h, w).astype(np.float32))
    return out


__all__ = ["decode_masks", "decode_probabilities", "segment"]
