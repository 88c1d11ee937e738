"""The family's :class:`~maskport.families.spec.FamilySpec`: every name other code reads."""

from ...heads.sam import sam_inputs
from .._common import BASE_INPUT
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="flmm",
    description="F-LMM: frozen LMM (LLaVA-1.5, Qwen2.5-VL) + U-Net mask head on its attention maps + SAM ViT-L refinement",
    mapping_version="1",
    config_class="FLMMConfig",
    model_class="FLMMModel",
    code_files=("configuration_flmm.py", "modeling_flmm.py"),
    heads=("image_utils", "sam_image"),
    inputs=(BASE_INPUT, *sam_inputs()),
    base_files=("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja"),
    quant_target=None,
    no_quant_reason="not built yet for F-LMM exports (4-bit attention maps change the masks: the drift must be "
                    "measured first; issue 16)",
    docs="docs/families/flmm.md",
)
