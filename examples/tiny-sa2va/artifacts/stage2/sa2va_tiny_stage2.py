accumulative_counts = 1
batch_size = 16
betas = (
    0.9,
    0.999,
)
dataloader_num_workers = 1
default_hooks = dict(
    checkpoint=dict(
        by_epoch=False,
        interval=1000,
        max_keep_ckpts=1,
        save_optimizer=False,
        type='mmengine.hooks.CheckpointHook'),
    logger=dict(
        interval=50,
        log_metric_by_epoch=False,
        type='mmengine.hooks.LoggerHook'),
    param_scheduler=dict(type='mmengine.hooks.ParamSchedulerHook'),
    sampler_seed=dict(type='mmengine.hooks.DistSamplerSeedHook'),
    timer=dict(type='mmengine.hooks.IterTimerHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    dist_cfg=dict(backend='nccl'),
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
load_from = None
log_level = 'INFO'
log_processor = dict(by_epoch=False)
lr = 0.001
max_iters = 1000
max_length = 512
max_norm = 1
max_pixels = 19600
min_pixels = 3136
model = dict(
    arch_type='qwen',
    frozen_sam2_decoder=False,
    grounding_encoder=dict(
        cfg_path='examples/tiny-sa2va/artifacts/sam2/tiny_sam2.config.json',
        ckpt_path='examples/tiny-sa2va/artifacts/sam2/tiny_sam2.pt',
        type='SAM2TrainRunner'),
    loss_dice=dict(loss_weight=0.5, type='DiceLoss'),
    loss_iou=dict(loss_weight=1.0, type='MSELoss'),
    loss_mask=dict(loss_weight=2.0, type='CrossEntropyLoss', use_sigmoid=True),
    mllm=dict(
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=dict(
            bias='none',
            lora_alpha=16,
            lora_dropout=0.0,
            modules_to_save=[
                'embed_tokens',
                'lm_head',
            ],
            r=8,
            target_modules=
            'model\\.language_model\\.layers\\.\\d+\\.(self_attn\\.(q_proj|k_proj|v_proj|o_proj)|mlp\\.(gate_proj|up_proj|down_proj))',
            task_type='CAUSAL_LM',
            type='peft.LoraConfig'),
        model_path='examples/tiny-sa2va/artifacts/base',
        type='Qwen2_5_VL'),
    pretrained_pth='examples/tiny-sa2va/artifacts/stage1_text_hidden_fcs.pth',
    special_tokens=[
        '[SEG]',
        '<p>',
        '</p>',
        '<vp>',
        '</vp>',
    ],
    tokenizer=dict(
        padding_side='right',
        pretrained_model_name_or_path='examples/tiny-sa2va/artifacts/base',
        trust_remote_code=True,
        type='transformers.AutoTokenizer.from_pretrained'),
    type='TinySa2VA')
optim_type = 'torch.optim.AdamW'
optim_wrapper = dict(
    accumulative_counts=1,
    clip_grad=dict(error_if_nonfinite=False, max_norm=1),
    optimizer=dict(
        betas=(
            0.9,
            0.999,
        ),
        lr=0.001,
        type='torch.optim.AdamW',
        weight_decay=0.01),
    type='mmengine.optim.OptimWrapper')
param_scheduler = [
    dict(
        begin=0,
        by_epoch=False,
        end=50,
        start_factor=0.01,
        type='mmengine.optim.LinearLR'),
    dict(
        begin=50,
        by_epoch=False,
        end=1000,
        eta_min=5e-05,
        type='mmengine.optim.CosineAnnealingLR'),
]
path = 'examples/tiny-sa2va/artifacts/base'
preprocessor = dict(
    max_pixels=19600,
    min_pixels=3136,
    pretrained_model_name_or_path='examples/tiny-sa2va/artifacts/base',
    type='transformers.Qwen2_5_VLProcessor.from_pretrained')
pretrained_pth = 'examples/tiny-sa2va/artifacts/stage1_text_hidden_fcs.pth'
prompt_families = dict(colour=0.25, new_colour=0.75)
randomness = dict(deterministic=False, seed=0)
resume = False
sam2_cfg_path = 'examples/tiny-sa2va/artifacts/sam2/tiny_sam2.config.json'
sam2_ckpt_path = 'examples/tiny-sa2va/artifacts/sam2/tiny_sam2.pt'
sam2_image_size = 128
save_steps = 1000
save_total_limit = 1
special_tokens = [
    '[SEG]',
    '<p>',
    '</p>',
    '<vp>',
    '</vp>',
]
template = 'qwen_chat'
tokenizer = dict(
    padding_side='right',
    pretrained_model_name_or_path='examples/tiny-sa2va/artifacts/base',
    trust_remote_code=True,
    type='transformers.AutoTokenizer.from_pretrained')
train_cfg = dict(by_epoch=False, max_iters=1000, val_interval=1001)
visualizer = None
warmup_iters = 50
weight_decay = 0.01
