"""The family's :class:`~maskport.families.spec.FamilySpec`: every name other code reads."""

from ...heads.sam2 import sam2_inputs
from .._common import BASE_INPUT, LORA_INPUTS
from ..spec import MMENGINE_TO_HF, FamilySpec, InputOption

RELEASED_COMMAND = "sa2va-hf-to-native"

SPEC = FamilySpec(
    name="sa2va-internvl",
    description="Sa2VA on InternVL2.5/3 (Qwen2 or InternLM2 LLM; LoRA + projector + SAM2 decoder + text_hidden_fcs)",
    mapping_version="1",
    config_class="Sa2VAInternVLConfig",
    model_class="Sa2VAInternVLModel",
    code_files=("configuration_sa2va_internvl.py", "modeling_sa2va_internvl.py"),
    heads=("image_utils", "seg_token", "sam2_image", "sam2_video"),
    inputs=(
        BASE_INPUT,
        *sam2_inputs(RELEASED_COMMAND),
        *LORA_INPUTS,
        InputOption("pretrained_pth", "path", "The earlier checkpoint this run started from (Sa2VA's pretrained_pth); "
                    "its tensors take the base's place.", commands=(MMENGINE_TO_HF,)),
    ),
    released_command=RELEASED_COMMAND,
    docs="docs/families/sa2va-internvl.md",
)
