"""``OverlaySource``: one source seen through another that replaces some of its tensors.

Used for chained fine-tunes (a training config that names an earlier checkpoint to start from): a run that started from an earlier full checkpoint
trained on top of *those* weights, not the base folder's, so the earlier checkpoint's tensors take the base's
place. The replaced base tensors are not silently hidden: :func:`overlay` also returns a view of them, which the
family drops with a stated reason, so the coverage report still accounts for every tensor of every input.
"""

from __future__ import annotations

import torch

from .sources import RenamedSource, TensorInfo, TensorSource


class OverlaySource(TensorSource):
    """``under``'s keys plus ``over``'s; a key present in both is read from ``over`` (shapes must agree)."""

    def __init__(self, under: TensorSource, over: TensorSource, description: str):
        super().__init__(under.name, under.path, description)
        self.under, self.over = under, over
        self._over_keys = set(over.keys())
        self._keys = list(dict.fromkeys([*under.keys(), *over.keys()]))

    def _src(self, key: str) -> TensorSource:
        return self.over if key in self._over_keys else self.under

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        return self._src(key).info(key)

    def load(self, key: str) -> torch.Tensor:
        return self._src(key).load(key)

    def buffer_nbytes(self, key: str) -> int:
        return self._src(key).buffer_nbytes(key)

    def load_into(self, key: str, buffer: torch.Tensor | None) -> torch.Tensor:
        return self._src(key).load_into(key, buffer)

    def reads_as(self, key: str, dtype: torch.dtype) -> bool:
        return self._src(key).reads_as(key, dtype)

    def load_into_as(self, key: str, dtype: torch.dtype, buffer: torch.Tensor | None) -> torch.Tensor:
        return self._src(key).load_into_as(key, dtype, buffer)

    def prefetch(self, key: str) -> None:
        self._src(key).prefetch(key)

    def file_span(self, key: str) -> tuple[int, int, int] | None:
        return self._src(key).file_span(key)

    def close(self) -> None:
        self.under.close()
        self.over.close()


def overlay(under: TensorSource, over: TensorSource, what: str) -> tuple[OverlaySource, RenamedSource, list[str]]:
    """(``under`` with ``over`` on top, a view of the ``under`` tensors that ``over`` replaces, problems). A
    replacement whose shape differs from the tensor it replaces is a problem (wrong checkpoint for this base)."""
    replaced = [k for k in over.keys() if k in under]
    problems = [f"{what}: {k} has shape {over.info(k).shape}, the tensor it replaces {under.info(k).shape}"
                for k in replaced if tuple(over.info(k).shape) != tuple(under.info(k).shape)]
    merged = OverlaySource(under, over, f"{under.description} + {what}")
    hidden = RenamedSource(under, {k: k for k in replaced}, f"{under.description}: tensors replaced by {what}")
    return merged, hidden, problems
