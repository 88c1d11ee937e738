"""meta['cfg'] is parsed as data: values come out, code never runs."""

from maskport.convert.training_config import Opaque, TrainingConfig, parse_config_text

CFG = '''
path = '/models/Qwen2.5-VL-3B-Instruct'
template = 'qwen_chat'
special_tokens = ['[SEG]', '<p>', '</p>', '<vp>', '</vp>']
lr = 4e-05 * 2
model = dict(
    type='projects.sa2va.models.Sa2VAModel',
    mllm=dict(type=Qwen2_5_VL, model_path=path, llm_lora=dict(type='peft.LoraConfig', r=128, lora_alpha=256,
              lora_dropout=0.05, target_modules=None)),
    special_tokens=special_tokens,
    pretrained_pth=None,
)
'''


def test_extracts_lora_base_tokens_template():
    tc = TrainingConfig.from_text(CFG)
    assert (tc.lora_r, tc.lora_alpha, tc.use_rslora) == (128, 256, False)
    assert tc.base_path == "/models/Qwen2.5-VL-3B-Instruct"
    assert tc.special_tokens == ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
    assert tc.template == "qwen_chat"
    assert tc.found_in["lora"] == "model.mllm.llm_lora"


def test_unknown_names_and_calls_stay_opaque():
    ns = parse_config_text("a = foo(1)\nb = os.system('echo hi')\nc = Qwen2_5_VL\n")
    assert isinstance(ns["a"], Opaque) and isinstance(ns["b"], Opaque) and ns["c"] == Opaque("Qwen2_5_VL")


def test_nothing_is_executed(tmp_path):
    marker = tmp_path / "ran"
    text = f"import os\nx = os.system('touch {marker}')\n__import__('os').system('touch {marker}')\n"
    TrainingConfig.from_text(text)
    assert not marker.exists()


def test_prompt_template_attribute_gives_its_name():
    tc = TrainingConfig.from_text("prompt_template = PROMPT_TEMPLATE.qwen_chat\n")
    assert tc.template == "qwen_chat"


def test_missing_or_broken_text_gives_empty_config():
    assert TrainingConfig.from_text(None).lora_r is None
    assert TrainingConfig.from_text("this is not python (").lora_alpha is None
