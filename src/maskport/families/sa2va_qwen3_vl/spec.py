"""The family's :class:`~maskport.families.spec.FamilySpec`: every name other code reads."""

from ...heads.sam2 import sam2_inputs
from .._common import BASE_INPUT, LORA_INPUTS
from ..spec import FamilySpec

RELEASED_COMMAND = "sa2va-hf-to-native"

SPEC = FamilySpec(
    name="sa2va-qwen3-vl",
    description="Sa2VA on Qwen3-VL (LoRA + modules_to_save + SAM2 mask decoder + text_hidden_fcs; DeepStack vision)",
    mapping_version="1",
    config_class="Sa2VAQwen3VLConfig",
    model_class="Sa2VAQwen3VLModel",
    code_files=("configuration_sa2va_qwen3_vl.py", "modeling_sa2va_qwen3_vl.py"),
    heads=("image_utils", "seg_token", "sam2_image", "sam2_video"),
    inputs=(BASE_INPUT, *sam2_inputs(RELEASED_COMMAND), *LORA_INPUTS),
    released_command=RELEASED_COMMAND,
    base_files=("preprocessor_config.json", "chat_template.json", "chat_template.jinja",
                "video_preprocessor_config.json"),
    docs="docs/families/sa2va-qwen3-vl.md",
)
