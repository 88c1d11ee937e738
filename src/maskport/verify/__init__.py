"""Comparing masks before and after conversion/quantization, and against ground truth.

``verify(ref, cand, samples, ...)`` (in :mod:`maskport.verify.api`) runs both models on the same samples and returns a
:class:`VerifyResult`; ``maskport verify`` is its command line (:mod:`maskport.verify.command`).
"""

from .api import VerifyResult, verify
from .compare import Thresholds
from .predictor import InMemoryModel
from .samples import Sample, load_image_folder, load_jsonl, load_refcoco, load_samples

__all__ = ["verify", "VerifyResult", "Thresholds", "InMemoryModel", "Sample", "load_jsonl", "load_image_folder",
           "load_refcoco", "load_samples"]
