"""``maskport quantize``: the click command (registered by ``maskport.cli``: ``main.add_command(quantize_command)``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli_errors import one_line_errors


_one_line_errors = one_line_errors


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@click.command("quantize")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--method", type=click.Choice(["gptq", "awq"]), default="gptq", show_default=True)
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help="-1: one group per column.")
@click.option("--desc-act/--no-desc-act", default=False, show_default=True, help="GPTQ act-order.")
@click.option("--sym/--zero-point", default=None,
              help="Symmetric, or asymmetric with zero points. Default: --sym for GPTQ, --zero-point for AWQ.")
@click.option("--damp", type=float, default=0.05, show_default=True, help="GPTQ damp_percent.")
@click.option("--awq-format", type=click.Choice(["gemm", "gemv"]), default="gemm", show_default=True)
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration samples: JSONL (image, prompt, optional answer), as for verify.")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="Use the first N samples.")
@click.option("--max-seq-len", type=int, default=2048, show_default=True,
              help="Longest calibration sequence; larger images get a smaller pixel budget.")
@click.option("--calib-text-only", is_flag=True,
              help="Calibrate without images (the prompts of --calib, or built-in prompts). Worse masks.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--offload-to-disk", is_flag=True, help="GPTQModel's layer offload (huge models, little RAM).")
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--kernel", help="GPTQModel kernel used while quantizing, e.g. gptq_triton or awq_torch (default: its "
              "own choice; on a Hopper GPU without internet name one: its choice there builds Machete from a "
              "downloaded CUTLASS).")
@click.option("--save-mllm", type=click.Path(path_type=Path),
              help="Also keep the quantized MLLM (Qwen2.5-VL / InternVL) on its own (GPTQModel/vLLM-loadable folder).")
@click.option("--verify-samples", type=click.Path(path_type=Path),
              help="Run maskport verify (quantized vs the unquantized export, and vs GT) and fail on its gate.")
@click.option("--min-dice", type=float, help="verify gate: mean Dice vs the unquantized export (default: verify's).")
@click.option("--max-giou-drop", type=float, help="verify gate: allowed gIoU drop vs GT (default: verify's).")
@click.option("--verify-device", default="auto", show_default=True)
@click.option("--verify-max-new-tokens", type=int, help="verify: generation length (default: the export's).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--trust-export-code", is_flag=True,
              help="Load the folder even if its Python files are not the export code this maskport writes (they run on load).")
@_one_line_errors
def quantize_command(export_dir, out, method, bits, group_size, desc_act, sym, damp, awq_format, calib,
                     calib_samples, max_seq_len, calib_text_only, device, offload_to_disk, max_shard_size, kernel,
                     save_mllm, verify_samples, min_dice, max_giou_drop, verify_device, verify_max_new_tokens, overwrite,
                     trust_export_code):
    """Quantize the language model of a maskport EXPORT_DIR to 4/8-bit GPTQ or AWQ (needs maskport[quant]).

    Only the decoder linears are quantized; the vision tower, lm_head, SAM2 and text_hidden_fcs keep their dtype.
    The output loads with AutoModel.from_pretrained(out, trust_remote_code=True) and has the same predict_forward.
    """
    from .api import quantize_export, verify_report_dir

    if not trust_export_code and (Path(export_dir) / "config.json").is_file():
        from ..families.export_code import check_export_code

        check_export_code(export_dir)

    verify_options = {"device": verify_device}
    if min_dice is not None:
        verify_options["min_dice"] = min_dice
    if max_giou_drop is not None:
        verify_options["max_giou_drop"] = max_giou_drop
    if verify_max_new_tokens is not None:
        verify_options["max_new_tokens"] = verify_max_new_tokens
    res = quantize_export(export_dir, out, method=method, bits=int(bits), group_size=group_size, desc_act=desc_act,
                          sym=sym, damp=damp, awq_format=awq_format, calib=calib, calib_samples=calib_samples,
                          max_seq_len=max_seq_len, calib_text_only=calib_text_only, device=device,
                          offload_to_disk=offload_to_disk, max_shard_size=max_shard_size, kernel=kernel,
                          save_mllm=save_mllm,
                          verify_samples=verify_samples, verify_options=verify_options, overwrite=overwrite,
                          log=lambda m: click.echo(m, err=True))
    rep = res.report
    b, a = rep["sizes"]["before"], rep["sizes"]["after"]
    click.echo(f"wrote {res.out_dir} ({rep['settings']['method'].upper()} {rep['settings']['bits']}-bit, "
               f"{rep['quantized_modules_count']} decoder linears, calibration: {rep['calibration']['samples']} "
               f"samples / {rep['calibration']['tokens']} tokens)")
    click.echo(f"  weights on disk: {_mb(b['files_bytes'])} -> {_mb(a['files_bytes'])}; decoder linears: "
               f"{_mb(b['param_bytes'].get('decoder_linears', 0))} -> {_mb(a['param_bytes'].get('decoder_linears', 0))}")
    click.echo(f"  kept in the export's dtype: {', '.join(rep['excluded_prefixes'])}")
    if res.verify is not None:
        click.echo(f"  verify: {res.verify.verdict} (report: {verify_report_dir(res.out_dir)})")
    click.echo(json.dumps({"quantization_report": str(res.out_dir / "quantization_report.json")}))
