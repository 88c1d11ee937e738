"""The family registry and the protocol a family implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


from ..convert.rules import Rule
from ..convert.sources import TensorSource, TrainingCheckpoint
from ..convert.training_config import TrainingConfig
from ..errors import WrongFamily


@dataclass
class ConvertOptions:
    """Everything a user can say about a conversion (CLI flags / API keyword arguments)."""

    base: Path | None = None
    sam2: Path | None = None
    sam2_config: Path | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool | None = None
    special_tokens: list[str] | None = None
    allow_unsafe_pickle: bool = False
    pretrained_pth: Path | None = None  # an earlier checkpoint the run started from (Sa2VA's pretrained_pth)
    sam2_normalization: str = "sa2va"   # SAM2 input mean/std: "sa2va" (bf16-rounded, as Sa2VA computes) | "exact"


@dataclass
class Prepared:
    """What a family hands the engine: sources, rules, context, the target model's shapes, and a callable
    that writes the non-weight files of the export folder."""

    sources: dict[str, TensorSource]
    rules: list[Rule]
    ctx: Any
    expected: dict[str, tuple[int, ...]]
    export_config: dict
    write_files: Any  # Callable[[Path], list[str]]: writes config/modeling/tokenizer files, returns names
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # resolved settings shown in the report (lora, tokens, ...)


class Family(Protocol):
    name: str
    mapping_version: str
    description: str

    def claims(self, ckpt: TrainingCheckpoint) -> bool:
        """Whether the training checkpoint's keys look like this family's."""

    def prepare(self, ckpt: TrainingCheckpoint, cfg: TrainingConfig, options: ConvertOptions) -> Prepared:
        """Open the other inputs, check they belong to this family, and build rules and the export config."""


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name} registered twice")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise WrongFamily(f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def detect_family(ckpt: TrainingCheckpoint) -> Family:
    hits = [f for f in FAMILIES.values() if f.claims(ckpt)]
    if len(hits) == 1:
        return hits[0]
    sample = ", ".join(sorted(ckpt.source.keys())[:3])
    if not hits:
        raise WrongFamily(
            f"{ckpt.source.path}: no known family recognises this checkpoint (keys like {sample}); "
            f"known families: {', '.join(sorted(FAMILIES))}. Pass --family to force one."
        )
    raise WrongFamily(f"{ckpt.source.path}: several families match ({', '.join(f.name for f in hits)}); pass --family")


def detect_released_family(folder: Path, folder_config: dict) -> Family:
    """The family that imports a released HF folder (families with ``claims_released``/``prepare_released``)."""
    hits = [f for f in FAMILIES.values() if getattr(f, "claims_released", None) and f.claims_released(folder_config)]
    if len(hits) != 1:
        known = [f.name for f in FAMILIES.values() if getattr(f, "claims_released", None)]
        raise WrongFamily(f"{folder}: no family imports a released folder of model_type "
                          f"{folder_config.get('model_type')!r} (families that import released folders: "
                          f"{', '.join(known) or 'none'})" if not hits else
                          f"{folder}: several families claim it: {', '.join(f.name for f in hits)}")
    return hits[0]
