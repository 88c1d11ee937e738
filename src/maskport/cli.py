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


def _family_options(command: str):
    """Click options for the inputs the families declare for ``command`` (``FamilySpec.inputs``), each once."""
    from .families import command_inputs

    return _input_options(command_inputs(command))


def _released_inputs():
    """The inputs of every released-folder import command (hf-to-mmengine imports a released folder first)."""
    from .families import command_inputs, released_commands

    seen: dict = {}
    for command in released_commands():
        for opt in command_inputs(command):
            seen.setdefault(opt.name, opt)
    return _input_options(list(seen.values()))


def _input_options(opts):
    def decorate(fn):
        for opt in reversed(opts):
            kw: dict = {"help": opt.help, "default": None}
            if opt.kind == "path":
                kw["type"] = click.Path(path_type=Path)
            elif opt.kind == "choice":
                kw["type"] = click.Choice(list(opt.choices))
            elif opt.kind in ("float", "int"):
                kw["type"] = {"float": float, "int": int}[opt.kind]
            if opt.default is not None:
                kw["help"] = f"{opt.help}  [default: {opt.default}]"
            fn = click.option(opt.flag, opt.name, **kw)(fn)
        return fn

    return decorate


def _output_options(fn):
    for decorator in reversed([
        click.option("-o", "--out", type=click.Path(path_type=Path), help="Output folder (must not exist)."),
        click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]),
                     help="Output dtype (default: the input's); torch's names are accepted too."),
        click.option("--max-shard-size", default="2GB", show_default=True,
                     help="Largest shard: 2GB = 2*10^9 bytes, 2GiB = 2*2^30 (as the Hub counts)."),
        click.option("--sha256", is_flag=True,
                     help="Record each shard's sha256 in conversion_report.json (about 1 s of CPU per 1.5 GB)."),
        click.option("--dry-run", is_flag=True, help="Plan and check coverage; write nothing."),
        click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists."),
        click.option("--allow-unsafe-pickle", is_flag=True,
                     help="DANGEROUS: unpickle with full pickle (runs code from the file). Only for files you trust."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]):
        fn = decorator(fn)
    return fn


@convert.command("mmengine-to-hf")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--family", help="Model family (default: detected from the checkpoint's keys).")
@_family_options("mmengine-to-hf")
@_output_options
@click.option("--report-json", is_flag=True, help="With --dry-run: print the full plan as JSON.")
@_friendly
def convert_mmengine_to_hf_cmd(checkpoint, family, out, dtype, max_shard_size, sha256, dry_run, overwrite,
                               allow_unsafe_pickle, no_progress, report_json, **inputs):
    """Convert an mmengine/xtuner training CHECKPOINT (iter_N.pth, a DeepSpeed ZeRO-1/2/3 folder, or what
    zero_to_fp32 wrote). The options between --family and -o are the inputs the families declare; each family reads
    its own."""
    from .convert.api import convert_mmengine_to_hf

    res = convert_mmengine_to_hf(
        checkpoint, out=out, family=family, dtype=dtype, max_shard_size=max_shard_size, sha256=sha256,
        dry_run=dry_run, overwrite=overwrite, allow_unsafe_pickle=allow_unsafe_pickle, progress=not no_progress,
        **inputs,
    )
    if report_json:
        click.echo(json.dumps(res.report, indent=2))
        return
    _echo_conversion(res, dry_run)


@convert.command("hf-to-mmengine")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output .pth file (must not exist).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]),
              help="dtype of the floating tensors (default: the export's).")
@click.option("--dry-run", is_flag=True, help="Plan and check coverage; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists (never an input).")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="DANGEROUS: unpickle .bin weights with full pickle (runs code from the file). Only for files you "
                   "trust.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_released_inputs()
@_friendly
def convert_hf_to_mmengine_cmd(folder, out, dtype, dry_run, overwrite, allow_unsafe_pickle, no_progress, **inputs):
    """Convert a maskport export FOLDER (or a released folder that a family imports, e.g. a ByteDance Sa2VA
    release) back into the .pth a Sa2VA training run loads as pretrained_pth to continue fine-tuning.

    The .pth is a plain {name: tensor} dict of the trained tensors (language model, embeddings, LM head,
    projector, SAM2 mask decoder, text_hidden_fcs) under the module names Sa2VA has before it wraps LoRA.
    LoRA stays merged into the weights: the new run adds fresh LoRA on top. Frozen parts (vision tower, SAM2
    encoder) are not written: the run loads them from its base model and SAM2 checkpoint. The --sam2-* options
    apply to a released folder only (as in its import command)."""
    from .convert.inverse import convert_hf_to_mmengine

    res = convert_hf_to_mmengine(folder, out=out, dtype=dtype, dry_run=dry_run, overwrite=overwrite,
                                 allow_unsafe_pickle=allow_unsafe_pickle, progress=not no_progress, **inputs)
    click.echo(f"family: {res.family}")
    click.echo(res.summary)
    for n in res.notes:
        click.echo(f"note: {n}")
    click.echo(f"{res.tensors} trained tensor(s) kept, {res.dropped} frozen tensor(s) left to the base model and "
               "SAM2 checkpoint")
    if dry_run:
        click.echo("dry run: plan is complete (every export tensor accounted for); nothing written")
    else:
        click.echo(f"wrote {res.out}")


def _released_command(command: str, families: list) -> click.Command:
    @click.argument("folder", type=click.Path(path_type=Path))
    @_family_options(command)
    @_output_options
    @_friendly
    def run(folder, out, dtype, max_shard_size, sha256, dry_run, overwrite, allow_unsafe_pickle, no_progress,
            **inputs):
        from .convert.api import convert_released_folder

        res = convert_released_folder(folder, command=command, out=out, dtype=dtype, max_shard_size=max_shard_size,
                                      sha256=sha256, dry_run=dry_run, overwrite=overwrite,
                                      allow_unsafe_pickle=allow_unsafe_pickle, progress=not no_progress, **inputs)
        _echo_conversion(res, dry_run)

    names = ", ".join(f.name for f in families)
    run.__doc__ = (f"Convert a released HF FOLDER ({names}) into maskport's native export: stock transformers "
                   "classes, no remote code of the folder run, quantizable and verifiable.")
    return convert.command(command)(run)


def _register_released_commands() -> None:
    from .families import released_commands

    for command, families in released_commands().items():
        _released_command(command, families)


_register_released_commands()


from .verify.command import verify_command  # noqa: E402  (its heavy imports happen when it runs)

from .quantize.command import quantize_command  # noqa: E402
from .demo import demo_command  # noqa: E402
from .serve.command import serve_command  # noqa: E402  (FastAPI/uvicorn/torch imported when it runs)

main.add_command(verify_command, "verify")
main.add_command(quantize_command, "quantize")
main.add_command(demo_command, "demo")
main.add_command(serve_command, "serve")


if __name__ == "__main__":  # pragma: no cover
    from .cli_errors import entry

    entry()
