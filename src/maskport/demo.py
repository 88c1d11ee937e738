"""``maskport demo``: convert the embedded tiny Sa2VA checkpoint and show what the export does.

The repository ships a tiny Sa2VA that was really trained (``examples/tiny-sa2va/``; its README says how):

- ``artifacts/base/``                  the base MLLM folder (a tiny Qwen2.5-VL), the ``--base`` of a conversion;
- ``artifacts/sam2/tiny_sam2.pt``       Meta-format SAM2 checkpoint (+ ``tiny_sam2.config.json``), the ``--sam2``;
- ``artifacts/stage2/iter_N.pth``       the genuine mmengine checkpoint of the fine-tuning (stage 2);
- ``artifacts/stage1_text_hidden_fcs.pth`` the projection as stage 1 left it (for the "without stage 2" pipeline);
- ``artifacts/heldout/samples.jsonl``   the held-out set (maskport's sample format plus a ``task`` field).

:func:`run_demo` converts the checkpoint with :func:`maskport.convert.api.convert_mmengine_to_hf`, loads the export
with ``AutoModel.from_pretrained(..., trust_remote_code=True)``, runs ``predict_forward`` on every held-out sample
and prints gIoU/cIoU against the ground truth, the share of answers with ``[SEG]`` and a few predictions.

:func:`build_without_stage2_checkpoint` writes the "fine-tune left out" checkpoint: the same file with the
stage-2 tensors replaced by what they were before stage 2 (LoRA B = 0, ``modules_to_save`` = the base's
embed_tokens/lm_head, SAM2 mask decoder = the base SAM2's, ``text_hidden_fcs`` = stage 1's). Converted and run
through the same pipeline, it shows what the fine-tune adds (``--without-stage2``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from .cli_errors import one_line_errors
from .errors import MissingInput

TASK_LABELS = {
    "stage2": 'prompts only the fine-tune taught: new colours, e.g. "the purple triangle"',
    "stage1": 'prompts of the base model, e.g. "the red triangle"',
}


# --------------------------------------------------------------------------------------------------------------
# where things are
# --------------------------------------------------------------------------------------------------------------
def default_artifacts() -> Path:
    """``examples/tiny-sa2va/artifacts`` of the checkout maskport runs from (an editable install)."""
    return Path(__file__).resolve().parents[2] / "examples" / "tiny-sa2va" / "artifacts"


@dataclass
class DemoArtifacts:
    root: Path
    base: Path
    sam2: Path
    ckpt: Path
    stage1_text_hidden_fcs: Path
    samples: Path

    @classmethod
    def find(cls, root: str | Path | None = None) -> "DemoArtifacts":
        root = Path(root) if root is not None else default_artifacts()
        if not root.is_dir():
            raise MissingInput(f"demo artifacts {root} not found: run from a maskport checkout (pip install -e .) "
                               "or pass --artifacts examples/tiny-sa2va/artifacts")
        ckpts = sorted((root / "stage2").glob("iter_*.pth"))
        if len(ckpts) != 1:
            raise MissingInput(f"expected one stage2/iter_N.pth under {root}, found {len(ckpts)}")
        art = cls(root=root, base=root / "base", sam2=root / "sam2" / "tiny_sam2.pt", ckpt=ckpts[0],
                  stage1_text_hidden_fcs=root / "stage1_text_hidden_fcs.pth",
                  samples=root / "heldout" / "samples.jsonl")
        for p in (art.base, art.sam2, art.samples):
            if not p.exists():
                raise MissingInput(f"demo artifact {p} is missing")
        return art


# --------------------------------------------------------------------------------------------------------------
# evaluation of an export folder
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    id: str
    task: str
    prompt: str
    prediction: str
    n_masks: int
    iou: float


@dataclass
class EvalResult:
    export_dir: Path
    giou: float
    ciou: float
    n: int
    seg_rate: float
    by_task: dict[str, dict[str, float]]
    samples: list[SampleResult] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"export_dir": str(self.export_dir), "giou": self.giou, "ciou": self.ciou, "n": self.n,
                "seg_rate": self.seg_rate, "by_task": self.by_task, "seconds": round(self.seconds, 1)}


def _tasks(samples_jsonl: Path) -> dict[str, str]:
    """id -> task, read from the JSONL's optional ``task`` field (``"all"`` when absent)."""
    out = {}
    for n, line in enumerate(samples_jsonl.read_text().splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            out[str(rec.get("id", n))] = str(rec.get("task", "all"))
    return out


def evaluate_export(export_dir: str | Path, samples_jsonl: str | Path, *, tasks: list[str] | None = None,
                    limit_per_task: int | None = None, progress: bool = True, dtype: str = "fp32",
                    desc: str = "predicting") -> EvalResult:
    """Run ``predict_forward`` of the export on the samples and score the first mask of each answer.

    A sample whose answer has no mask counts as an empty prediction (IoU 0 against a non-empty mask).
    ``tasks``/``limit_per_task`` select a subset (in file order).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from .verify.metrics import iou, set_scores
    from .verify.samples import load_jsonl

    export_dir, samples_jsonl = Path(export_dir), Path(samples_jsonl)
    samples = load_jsonl(samples_jsonl)
    task_of = _tasks(samples_jsonl)
    chosen, count = [], {}
    for s in samples:
        t = task_of.get(s.id, "all")
        if tasks is not None and t not in tasks:
            continue
        if limit_per_task is not None and count.get(t, 0) >= limit_per_task:
            continue
        count[t] = count.get(t, 0) + 1
        chosen.append((s, t))
    if not chosen:
        raise MissingInput(f"no samples selected from {samples_jsonl} (tasks={tasks})")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = AutoModel.from_pretrained(str(export_dir), trust_remote_code=True, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir), trust_remote_code=True)
    t0 = time.time()
    pairs, per_task, results, with_seg = [], {}, [], 0
    iterator = chosen
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(chosen, desc=desc, unit="sample", file=sys.stderr)
    for s, t in iterator:
        gt = s.gt_mask()
        if gt is None:
            raise MissingInput(f"sample {s.id} has no gt_mask")
        out = model.predict_forward(image=s.image(), text=s.prompt, tokenizer=tokenizer, max_new_tokens=32)
        masks = out["prediction_masks"]
        pred = np.asarray(masks[0][0], dtype=bool) if masks else np.zeros_like(gt)
        with_seg += "[SEG]" in out["prediction"]
        pairs.append((pred, gt))
        per_task.setdefault(t, []).append((pred, gt))
        results.append(SampleResult(s.id, t, s.prompt, out["prediction"], len(masks), iou(pred, gt)))
    seconds = time.time() - t0
    total = set_scores(pairs)
    by_task = {}
    for t, ps in per_task.items():
        sc = set_scores(ps)
        by_task[t] = {"giou": sc.giou, "ciou": sc.ciou, "n": sc.n}
    return EvalResult(export_dir=export_dir, giou=total.giou, ciou=total.ciou, n=total.n,
                      seg_rate=with_seg / len(chosen), by_task=by_task, samples=results, seconds=seconds)


# --------------------------------------------------------------------------------------------------------------
# the "fine-tune left out" checkpoint
# --------------------------------------------------------------------------------------------------------------
_PEFT = "mllm.model.base_model.model."
_DECODER = "grounding_encoder.sam2_model.sam_mask_decoder."


def build_without_stage2_checkpoint(artifacts: DemoArtifacts, dst: str | Path) -> Path:
    """Write ``dst``: the stage-2 checkpoint with every trained tensor set back to its value before stage 2.

    - ``lora_B`` = 0 (peft's initialisation: the adapter adds nothing; ``lora_A`` is kept, it is then unused);
    - ``embed_tokens``/``lm_head`` ``modules_to_save`` copies = the base folder's tensors (the base already holds
      the five Sa2VA tokens: stage 1 trained them);
    - the SAM2 mask decoder = the base SAM2 checkpoint's ``sam_mask_decoder.*``;
    - ``text_hidden_fcs`` = stage 1's (``stage1_text_hidden_fcs.pth``, the stage-2 run's ``pretrained_pth``).

    ``meta`` (with the training config) is kept, so the converter reads the same LoRA/tokens/template settings;
    ``message_hub`` (training logs) is left out. Every tensor keeps its key, shape and dtype.
    """
    import torch
    from safetensors import safe_open

    from .convert.safe_load import safe_torch_load

    ck = safe_torch_load(artifacts.ckpt, mmap=False)
    sd = ck["state_dict"]
    base: dict[str, torch.Tensor] = {}
    for f in sorted(artifacts.base.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                base[k] = h.get_tensor(k)

    def base_tensor(*names):
        for n in names:
            if n in base:
                return base[n]
        raise MissingInput(f"{artifacts.base}: none of {names} found")

    sam2 = safe_torch_load(artifacts.sam2, mmap=False)["model"]
    fcs = safe_torch_load(artifacts.stage1_text_hidden_fcs, mmap=False)["state_dict"]
    new, changed = {}, {"lora_B": 0, "modules_to_save": 0, "mask_decoder": 0, "text_hidden_fcs": 0, "kept": 0}
    for k, v in sd.items():
        if ".lora_B." in k:
            val, kind = torch.zeros_like(v), "lora_B"
        elif k.endswith("embed_tokens.modules_to_save.default.weight"):
            val = base_tensor("model.language_model.embed_tokens.weight", "model.embed_tokens.weight")
            kind = "modules_to_save"
        elif k.endswith("lm_head.modules_to_save.default.weight"):
            val, kind = base_tensor("lm_head.weight"), "modules_to_save"
        elif k.startswith(_DECODER):
            val, kind = sam2["sam_mask_decoder." + k[len(_DECODER):]], "mask_decoder"
        elif k.startswith("text_hidden_fcs."):
            val, kind = fcs[k], "text_hidden_fcs"
        else:
            val, kind = v, "kept"
        if tuple(val.shape) != tuple(v.shape):
            raise MissingInput(f"{k}: shape {tuple(val.shape)} before stage 2, {tuple(v.shape)} after")
        new[k] = val.to(v.dtype).clone()
        changed[kind] += 1
    if changed["lora_B"] == 0 or changed["mask_decoder"] == 0 or changed["text_hidden_fcs"] == 0 \
            or changed["modules_to_save"] != 2:
        raise MissingInput(f"{artifacts.ckpt}: unexpected layout ({changed})")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": ck.get("meta", {}), "state_dict": new}, dst)
    return dst


# --------------------------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------------------------
def _convert(ckpt: Path, art: DemoArtifacts, out: Path, progress: bool, log: Callable[[str], None]):
    from .convert.api import convert_mmengine_to_hf

    # fp32 output: CPUs run bf16 matmuls slowly; the values are the trained (bf16) ones, the LoRA merge exact
    # the example's training normalises SAM2's input with the exact float32 ImageNet constants (model.py)
    return convert_mmengine_to_hf(ckpt, base=art.base, sam2=art.sam2, out=out, dtype="fp32", overwrite=True,
                                  sam2_normalization="exact",
                                  progress=progress, log=log)


def _print_scores(ev: EvalResult, echo: Callable[[str], None]) -> None:
    echo(f"  {'prompts':<9} {'n':>4} {'gIoU':>6} {'cIoU':>6}")
    for t in sorted(ev.by_task, key=lambda t: (t != "stage2", t)):
        s = ev.by_task[t]
        echo(f"  {t:<9} {s['n']:>4} {s['giou']:>6.3f} {s['ciou']:>6.3f}   {TASK_LABELS.get(t, '')}")
    echo(f"  {'all':<9} {ev.n:>4} {ev.giou:>6.3f} {ev.ciou:>6.3f}")
    n_seg = round(ev.seg_rate * ev.n)
    echo(f"  [SEG] in {n_seg}/{ev.n} answers ({100 * ev.seg_rate:.1f}%)")


def run_demo(out_dir: str | Path = "exports/tiny-sa2va", *, artifacts: str | Path | None = None,
             show: int = 6, without_stage2: bool = False, limit_per_task: int | None = None,
             progress: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Convert the embedded checkpoint into ``out_dir``, evaluate the export on the held-out set, print it all.

    Returns ``{"export_dir", "giou", "ciou", "n", "seg_rate", "by_task", "seconds", "convert_seconds"}`` and, with
    ``without_stage2``, ``"without_stage2": {... the same for the fine-tune left out ...}``.
    """
    import tempfile

    t_start = time.time()
    art = DemoArtifacts.find(artifacts)
    out_dir = Path(out_dir)
    quiet = lambda msg: None  # noqa: E731 - the converter's table is long; we print our own summary
    echo("maskport demo: a tiny Sa2VA (Qwen2.5-VL + SAM2) trained with mmengine -- examples/tiny-sa2va")
    echo(f"  checkpoint  {art.ckpt}")
    echo(f"  base        {art.base}")
    echo(f"  sam2        {art.sam2}")
    t0 = time.time()
    res = _convert(art.ckpt, art, out_dir, progress, quiet)
    convert_s = time.time() - t0
    cov = res.report["coverage"]
    ck = cov["sources"]["ckpt"]
    echo(f"converted in {convert_s:.1f} s: {cov['targets']} target tensors; all {ck['used']} trained tensors of the "
         f"checkpoint used (LoRA merged, embed/lm_head, SAM2 mask decoder, text_hidden_fcs); "
         f"{len(cov.get('unaccounted', []))} unaccounted")
    ev = evaluate_export(out_dir, art.samples, limit_per_task=limit_per_task, progress=progress,
                         desc="predicting (export)")
    echo(f"held-out set ({art.samples}), predicted by the export in {ev.seconds:.0f} s:")
    _print_scores(ev, echo)
    if show:
        echo("a few predictions:")
        picked = [r for r in ev.samples if r.task == "stage2"][: (show + 1) // 2]
        picked += [r for r in ev.samples if r.task != "stage2"][: show - len(picked)]
        for r in picked:
            echo(f"  {r.id:<13} {r.prompt.replace('<image>', ''):<45} -> {r.prediction!r:<26} IoU {r.iou:.2f}")
    result = ev.as_dict()
    result["convert_seconds"] = round(convert_s, 1)
    if without_stage2:
        with tempfile.TemporaryDirectory(prefix="maskport-demo-") as tmp:
            ckpt0 = build_without_stage2_checkpoint(art, Path(tmp) / art.ckpt.name)
            out0 = Path(tmp) / "export-without-stage2"
            _convert(ckpt0, art, out0, progress, quiet)
            ev0 = evaluate_export(out0, art.samples, limit_per_task=limit_per_task, progress=progress,
                                  desc="predicting (without stage 2)")
        echo("the same pipeline with the stage-2 fine-tune left out (base + SAM2 + stage-1 text_hidden_fcs):")
        _print_scores(ev0, echo)
        for t in sorted(set(ev.by_task) & set(ev0.by_task), key=lambda t: (t != "stage2", t)):
            echo(f"  fine-tune effect on {t} prompts: gIoU {ev0.by_task[t]['giou']:.3f} -> {ev.by_task[t]['giou']:.3f}")
        result["without_stage2"] = ev0.as_dict()
    echo(f"export: {out_dir.resolve()}")
    echo("  load it with AutoModel.from_pretrained(path, trust_remote_code=True) and call "
         "model.predict_forward(image=..., text=\"<image>Please segment the purple triangle.\", tokenizer=...)")
    result["total_seconds"] = round(time.time() - t_start, 1)
    echo(f"done in {result['total_seconds']:.0f} s")
    return result


@click.command("demo")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("exports/tiny-sa2va"),
              show_default=True, help="Where to write the export (replaced if it exists).")
@click.option("--artifacts", type=click.Path(path_type=Path), default=None,
              help="The demo's artifacts folder (default: examples/tiny-sa2va/artifacts of this checkout).")
@click.option("--without-stage2", is_flag=True,
              help="Also convert and evaluate the checkpoint with the fine-tune left out, and compare.")
@click.option("--limit", "limit_per_task", type=int, default=None, help="At most this many samples per task.")
@click.option("--show", type=int, default=6, show_default=True, help="How many predictions to print.")
@click.option("--json", "as_json", is_flag=True, help="Also print the numbers as one JSON line.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@one_line_errors
def demo_command(out_dir, artifacts, without_stage2, limit_per_task, show, as_json, no_progress):
    """Convert the embedded tiny Sa2VA checkpoint and evaluate the export on its held-out set."""
    res = run_demo(out_dir, artifacts=artifacts, show=show, without_stage2=without_stage2,
                   limit_per_task=limit_per_task, progress=not no_progress, echo=click.echo)
    if as_json:
        click.echo(json.dumps(res))


if __name__ == "__main__":  # python -m maskport.demo
    demo_command()
