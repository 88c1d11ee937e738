"""The family's :class:`~maskport.families.spec.FamilySpec`: every name other code reads."""

from ...heads.sam import sam_inputs
from .._common import BASE_INPUT, LORA_INPUTS
from ..spec import MMENGINE_TO_HF, FamilySpec, InputOption

RELEASED_COMMAND = "lisa-hf-to-native"

CLIP_INPUT = InputOption(
    "clip", "path", "CLIP vision folder the LLaVA base uses (e.g. openai/clip-vit-large-patch14; LISA's released "
    "folders and its training checkpoints without frozen weights do not hold it).",
    commands=(MMENGINE_TO_HF, RELEASED_COMMAND))

SPEC = FamilySpec(
    name="lisa",
    description="LISA: LLaVA v1 (Llama + CLIP ViT-L/14) + SAM ViT-H + text_hidden_fcs (LoRA q/v, full "
                "embed_tokens/lm_head, SAM mask decoder)",
    mapping_version="1",
    config_class="LisaConfig",
    model_class="LisaModel",
    code_files=("configuration_lisa.py", "modeling_lisa.py"),
    heads=("image_utils", "seg_token", "sam_image"),
    inputs=(BASE_INPUT, CLIP_INPUT, *sam_inputs(), *LORA_INPUTS),
    released_command=RELEASED_COMMAND,
    base_files=(),
    docs="docs/families/lisa.md",
)
