"""``maskport verify REF CAND``: the click command. Registered by ``maskport.cli`` as ``verify``.

Exit codes: 0 pass, 1 drift beyond the thresholds, 2 could not run (one-line error; ``maskport --debug`` shows
the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..cli_errors import one_line_errors
from ..errors import MissingInput
from ..io.jsonfile import loads_bounded
from .compare import Thresholds


_one_line_errors = one_line_errors(first_line_only=True)


def _fmt(v, digits=4):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _print_result(res, report_dir) -> None:
    r = res.report
    s = r["summary"]
    word = "PASS" if res.passed else "FAIL"
    click.echo(f"verdict: {word} ({s['n_samples']} samples)")
    for f in res.failures:
        click.echo(f"  failed: {f}")
    click.echo("gate:")
    for g in r["gates"]:
        status = ("pass" if g["passed"] else "FAIL") if g["applicable"] else "n/a (no GT)"
        click.echo(f"  {g['option']:<20} {g['metric']:<38} {_fmt(g['value']):>8} {g['comparison']} "
                   f"{g['threshold']:<6g} {status}")
    d, i = s["dice"], s["iou"]
    click.echo(f"Dice REF vs CAND  mean {_fmt(d['mean'])}  min {_fmt(d['min'])}  p5 {_fmt(d['p5'])}  "
               f"p50 {_fmt(d['p50'])}  p95 {_fmt(d['p95'])}")
    click.echo(f"IoU  REF vs CAND  mean {_fmt(i['mean'])}  min {_fmt(i['min'])}  p5 {_fmt(i['p5'])}  "
               f"p50 {_fmt(i['p50'])}  p95 {_fmt(i['p95'])}")
    dp = s["max_abs_dprob"]
    click.echo(f"max |dprob| {_fmt(None if dp is None else dp['max'])}  answers differ {s['text_mismatches']}/"
               f"{s['n_samples']}  mean edit distance {s['mean_edit_distance']:.2f}  [SEG] count agreement "
               f"{100 * s['seg_count_agreement_rate']:.1f}%  no mask: REF {s['no_mask']['ref']} CAND "
               f"{s['no_mask']['cand']}")
    gt = s["gt"]
    if gt is not None:
        click.echo(f"vs GT ({gt['n']} samples)  gIoU REF {_fmt(gt['ref']['giou'])} CAND {_fmt(gt['cand']['giou'])} "
                   f"(drop {_fmt(gt['giou_drop'])})  cIoU REF {_fmt(gt['ref']['ciou'])} CAND "
                   f"{_fmt(gt['cand']['ciou'])} (drop {_fmt(gt['ciou_drop'])})")
    if report_dir is not None:
        click.echo(f"report: {Path(report_dir) / 'index.html'} and report.json")
    else:
        click.echo("no --report folder given: report not written")


@click.command("verify", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("ref", type=click.Path(path_type=Path))
@click.argument("cand", type=click.Path(path_type=Path))
@click.option("--samples", type=click.Path(path_type=Path),
              help="JSONL of {image, prompt, gt_mask?} (paths relative to the file), or a folder of images "
                   "(with --prompt).")
@click.option("--prompt", help="The prompt for every image of a --samples folder, e.g. '<image>Please segment "
                               "the vessel.'")
@click.option("--refcoco", "refcoco_refs", type=click.Path(path_type=Path),
              help="RefCOCO-style refs file (refs(unc).p or JSON) instead of --samples; needs --instances and "
                   "--image-root.")
@click.option("--instances", type=click.Path(path_type=Path), help="COCO instances.json for --refcoco.")
@click.option("--image-root", type=click.Path(path_type=Path), help="Folder of the COCO images for --refcoco.")
@click.option("--split", default="val", show_default=True, help="RefCOCO split ('all' for every ref).")
@click.option("--prompt-template", default="<image>Please segment {sentence}.", show_default=True,
              help="RefCOCO prompt; {sentence} is the referring expression.")
@click.option("--limit", type=int, help="Use only the first N samples.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path),
              help="Folder for report.json, index.html and images/ (created; its previous report is replaced).")
@click.option("--min-dice", type=float, default=Thresholds.min_dice, show_default=True,
              help="Fail when the mean Dice REF vs CAND is below this.")
@click.option("--max-giou-drop", type=float, default=Thresholds.max_giou_drop, show_default=True,
              help="Fail when gIoU(REF, GT) - gIoU(CAND, GT) is above this (samples with GT only).")
@click.option("--max-text-mismatch", type=float, default=Thresholds.max_text_mismatch, show_default=True,
              help="Fail when the share of samples with different answers is above this.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Load both models in this dtype (auto: each export's own).")
@click.option("--num-processes", type=int, default=1, show_default=True,
              help="Data-parallel worker processes (one GPU each with CUDA; gloo on CPU). Under torchrun, leave out.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per predict_forward call: one left-padded batch through the LLM (maskport exports).")
@click.option("--max-new-tokens", type=int, help="Longest answer (default: each export's config).")
@click.option("--mask-threshold", type=float, help="Probability threshold of the masks (default: the export's).")
@click.option("--time-budget", type=float,
              help="Seconds per sample per model; generation stops there and the sample is flagged.")
@click.option("--no-probabilities", is_flag=True, help="Do not ask for probability maps (no max |dprob|).")
@click.option("--overlays", type=int, default=12, show_default=True, help="Worst samples drawn in index.html.")
@click.option("--overlay-sample", type=int, default=12, show_default=True,
              help="Other samples drawn (a fixed random choice).")
@click.option("--generation-kwargs", "generation_kwargs_json", metavar="JSON",
              help='Advanced: JSON passed to generate for both models, e.g. \'{"sequence_bias": {"[SEG]": 30.0}}\' '
                   "(token strings as keys of sequence_bias).")
@click.option("--max-image-pixels", type=click.IntRange(min=1),
              help="Largest image (width x height) decoded; larger ones are refused before decoding "
                   "[default: 40000000].")
@click.option("--trust-export-code", is_flag=True,
              help="Load the folder even if its Python files are not the export code this maskport writes (they run on load).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_one_line_errors
def verify_command(ref, cand, samples, prompt, refcoco_refs, instances, image_root, split, prompt_template, limit,
                   report_dir, min_dice, max_giou_drop, max_text_mismatch, device, dtype, num_processes,
                   batch_size, max_new_tokens, mask_threshold, time_budget, no_probabilities, overlays, overlay_sample,
                   generation_kwargs_json, max_image_pixels, trust_export_code, no_progress):
    """Run REF and CAND (export folders) on the same samples and compare their masks and answers.

    Exit code 0: pass; 1: drift beyond the thresholds (listed); 2: could not run.
    """
    from ..io import check_output_apart
    from .api import verify
    from .samples import load_refcoco

    if max_image_pixels is not None:
        os.environ["MASKPORT_MAX_IMAGE_PIXELS"] = str(max_image_pixels)  # worker processes inherit it
    if report_dir is not None:
        check_output_apart(report_dir, [ref, cand, samples, refcoco_refs, instances, image_root])
    if not trust_export_code:
        from ..families.export_code import check_export_code

        for role, folder in (("REF", ref), ("CAND", cand)):
            if (Path(folder) / "config.json").is_file():
                check_export_code(folder, role)

    generation_kwargs = None
    if generation_kwargs_json:
        try:
            generation_kwargs = loads_bounded(generation_kwargs_json, max_bytes=1 << 20, max_depth=16)
        except ValueError as exc:
            raise MissingInput(f"--generation-kwargs is not JSON: {exc}") from exc
        if not isinstance(generation_kwargs, dict):
            raise MissingInput("--generation-kwargs must be a JSON object")
    label = None
    if refcoco_refs is not None:
        if samples is not None or prompt:
            raise MissingInput("--refcoco takes its prompts from the refs (see --prompt-template): "
                               "leave out --samples and --prompt")
        if instances is None or image_root is None:
            raise MissingInput("--refcoco needs --instances (COCO instances.json) and --image-root (the images)")
        sample_list = load_refcoco(refcoco_refs, instances, image_root, split=None if split == "all" else split,
                                   prompt_template=prompt_template, limit=limit)
        label = f"refcoco {refcoco_refs} split {split}"
    elif samples is not None:
        sample_list = samples
    else:
        raise MissingInput("no samples: give --samples FILE.jsonl, --samples FOLDER --prompt TEXT, or --refcoco")
    thresholds = Thresholds(min_dice=min_dice, max_giou_drop=max_giou_drop, max_text_mismatch=max_text_mismatch)
    res = verify(ref, cand, sample_list, report_dir=report_dir, thresholds=thresholds, prompt=prompt,
                 limit=limit if refcoco_refs is None else None, device=device, dtype=dtype,
                 generation_kwargs=generation_kwargs, max_new_tokens=max_new_tokens, mask_threshold=mask_threshold,
                 time_budget=time_budget, probabilities=not no_probabilities, num_processes=num_processes,
                 batch_size=batch_size,
                 overlays_worst=overlays, overlays_sample=overlay_sample, progress=not no_progress,
                 samples_label=label)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        sys.exit(0)  # under torchrun: rank 0 alone reports, and its exit code is the verdict
    _print_result(res, report_dir)
    sys.exit(res.exit_code)
