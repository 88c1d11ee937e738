"""The ``maskport`` command line. Thin: parse, call the API, print. Errors -> one line, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import __version__
from .cli_errors import one_line_errors


_friendly = one_line_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maskport")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug: bool) -> None:
    """Turn segmentation-MLLM training checkpoints into verified, deployable HuggingFace models."""


@main.group()
def convert() -> None:
    """Convert checkpoints into HF export folders."""


def _echo_conversion(res, dry_run: bool) -> None:
    click.echo(f"family: {res.family}")
    click.echo(res.summary)
    for n in res.notes:
        click.echo(f"note: {n}")
    if dry_run:
        click.echo("dry run: plan is complete (every source tensor accounted for); nothing written")
    else:
        click.echo(f"wrote {res.out_dir} ({len(res.report['shards'])} shard(s), {res.report['seconds']} s)")


@convert.command("mmengine-to-hf")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), help="Base MLLM folder (e.g. Qwen2.5-VL-3B-Instruct).")
@click.option("--sam2", type=click.Path(path_type=Path), help="Meta's SAM2 checkpoint (e.g. sam2_hiera_large.pt).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--family", help="Model family (default: detected from the checkpoint's keys).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Output dtype (default: the training dtype).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest shard, e.g. 2GB, 500MB.")
@click.option("--sam2-config", type=click.Path(path_type=Path),
              help="JSON of Meta's SAM2 model config, for a non-official SAM2 (default: detected from shapes, "
                   "or <sam2>.config.json beside the checkpoint).")
@click.option("--lora-alpha", type=float, help="LoRA alpha (default: from the checkpoint's training config).")
@click.option("--lora-r", type=int, help="LoRA rank, checked against the tensors.")
@click.option("--special-tokens", help="Comma-separated special tokens added in training (default: from the config).")
@click.option("--pretrained-pth", type=click.Path(path_type=Path),
              help="The earlier checkpoint this run started from (Sa2VA's pretrained_pth); its tensors take the "
                   "base's place. InternVL family.")
@click.option("--sam2-normalization", type=click.Choice(["sa2va", "exact"]), default="sa2va", show_default=True,
              help="SAM2 input mean/std: 'sa2va' = ImageNet's rounded to bfloat16, as Sa2VA's code computes them "
                   "(masks equal Sa2VA's own predict_forward); 'exact' for models trained with float32 "
                   "preprocessing.")
@click.option("--sha256", is_flag=True,
              help="Record each shard's sha256 in conversion_report.json (about 1 s of CPU per 1.5 GB).")
@click.option("--dry-run", is_flag=True, help="Plan and check coverage; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--report-json", is_flag=True, help="With --dry-run: print the full plan as JSON.")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="DANGEROUS: unpickle with full pickle (runs code from the file). Only for files you trust.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_friendly
def convert_mmengine_to_hf_cmd(checkpoint, base, sam2, out, family, dtype, max_shard_size, sam2_config, lora_alpha,
                               lora_r, special_tokens, pretrained_pth, sam2_normalization, sha256, dry_run, overwrite, report_json,
                               allow_unsafe_pickle, no_progress):
    """Convert an mmengine/xtuner training CHECKPOINT (iter_N.pth, or a DeepSpeed ZeRO-1/2 folder)."""
    from .convert.api import convert_mmengine_to_hf

    res = convert_mmengine_to_hf(
        checkpoint, base=base, sam2=sam2, out=out, family=family, dtype=dtype, max_shard_size=max_shard_size,
        sam2_config=sam2_config, lora_r=lora_r, lora_alpha=lora_alpha,
        special_tokens=special_tokens.split(",") if special_tokens else None, pretrained_pth=pretrained_pth,
        sam2_normalization=sam2_normalization, sha256=sha256, dry_run=dry_run,
        overwrite=overwrite, allow_unsafe_pickle=allow_unsafe_pickle, progress=not no_progress,
    )
    if report_json:
        click.echo(json.dumps(res.report, indent=2))
        return
    _echo_conversion(res, dry_run)


@convert.command("sa2va-hf-to-native")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Output dtype (default: the folder's).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest shard, e.g. 2GB, 500MB.")
@click.option("--sam2-config", type=click.Path(path_type=Path),
              help="Meta SAM2 model config (JSON) when the SAM2 size cannot be told from the tensor shapes.")
@click.option("--sam2-normalization", type=click.Choice(["sa2va", "exact"]), default="sa2va", show_default=True,
              help="SAM2 input mean/std: 'sa2va' = ImageNet's rounded to bfloat16, as Sa2VA's code computes them "
                   "(masks equal Sa2VA's own predict_forward); 'exact' for models trained with float32 "
                   "preprocessing.")
@click.option("--sha256", is_flag=True,
              help="Record each shard's sha256 in conversion_report.json (about 1 s of CPU per 1.5 GB).")
@click.option("--dry-run", is_flag=True, help="Plan and check coverage; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="DANGEROUS: let .bin weights run arbitrary pickled code (only for files you trust).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_friendly
def convert_sa2va_hf_to_native_cmd(folder, out, dtype, max_shard_size, sam2_config, sam2_normalization, sha256, dry_run, overwrite,
                                   allow_unsafe_pickle, no_progress):
    """Convert a released Sa2VA HF FOLDER (ByteDance/Sa2VA-1B/4B/8B/26B, Sa2VA-InternVL3-*) into maskport's native
    export: stock transformers classes, no remote code of the folder run, quantizable and verifiable."""
    from .convert.api import convert_sa2va_hf_to_native

    res = convert_sa2va_hf_to_native(folder, out=out, dtype=dtype, max_shard_size=max_shard_size,
                                     sam2_config=sam2_config, sam2_normalization=sam2_normalization, sha256=sha256, dry_run=dry_run, overwrite=overwrite,
                                     allow_unsafe_pickle=allow_unsafe_pickle, progress=not no_progress)
    _echo_conversion(res, dry_run)


from .verify.command import verify_command  # noqa: E402  (its heavy imports happen when it runs)

from .quantize.command import quantize_command  # noqa: E402
from .demo import demo_command  # noqa: E402

main.add_command(verify_command, "verify")
main.add_command(quantize_command, "quantize")
main.add_command(demo_command, "demo")


if __name__ == "__main__":  # pragma: no cover
    main()
