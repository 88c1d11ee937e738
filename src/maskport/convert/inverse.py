"""Back to training: an export folder -> the ``.pth`` a training run loads (as its pretrained weights) to continue
fine-tuning. The API behind ``maskport convert hf-to-mmengine``.

Nothing here is written twice: the way back is the family's forward mapping table, inverted.

- A family says, for a given export config, what its training checkpoint holds (:class:`TrainingLayout`): the
  forward table as built for such an export, the name of the training checkpoint's source in it, and the renames
  from the checkpoint's names to the names the training code loads its pretrained weights under (e.g. the module
  names before an adapter library wraps them).
- :func:`invert` turns every rule that reads the training checkpoint into a rule that reads the export: its
  targets become the inputs (matched against the export's keys by the same patterns), the checkpoint tensor it read
  becomes the output (renamed), and its op is replaced by the op's inverse (:func:`inverse_op`). A LoRA merge has
  no inverse that recovers ``A`` and ``B``; the merged weight is the layer's weight, written under the layer's
  name (the adapters stay merged). Rules that read only other inputs (a base model, a head checkpoint) are the frozen part: the
  training run builds it from those inputs again, so its export tensors are dropped with that reason
  (:class:`~maskport.convert.rules.DropRest`).
- The inverted table goes through the same planner as a conversion (every export tensor used or dropped, every
  shape computed, a tensor claimed twice is an error), then the tensors are computed one step at a time and
  streamed into torch's zip format as a plain ``{name: tensor}`` dict (:mod:`maskport.io.torch_zip`: what
  ``torch.save`` writes for it, no code, loadable with ``weights_only=True``; memory holds one step's tensors), in a
  temporary file beside the output that is renamed into place.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


from ..errors import MissingInput, WrongFamily
from . import ops
from .plan import Plan, build_plan
from .report import format_table
from .rules import Apply, Concat, CopyRest, Duplicate, DropRest, LoraMerge, Rename, Rule, Split, Take, parse_ref
from .rules import _PLACEHOLDER  # noqa: PLC2701 - the one placeholder syntax

EXPORT = "export"


@dataclass(frozen=True)
class TrainingLayout:
    """What a family's training checkpoint holds, for one export config.

    ``rules``: the forward table (targets = the export's keys); ``source``: the training checkpoint's source name
    in it; ``renames``: ``(old, new)`` substrings replaced, in order, in the checkpoint's names to give the names
    the training code loads pretrained weights under; ``frozen_reason``: why the export's other tensors are left
    out; ``notes``: said to the user."""

    rules: Sequence[Rule]
    source: str
    renames: tuple[tuple[str, str], ...] = ()
    frozen_reason: str = "not trained: the training run builds it from its other inputs"
    notes: tuple[str, ...] = ()


class NotInvertible(ValueError):
    """A rule of the forward table whose op has no inverse in the engine."""


def _io_patterns(rule: Rule) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(target patterns, input patterns) of a forward rule."""
    targets = tuple(rule.targets) if hasattr(rule, "targets") else (rule.target,)
    if isinstance(rule, LoraMerge):
        inputs: tuple[str, ...] = (rule.base, rule.a, rule.b)
    elif hasattr(rule, "sources"):
        inputs = tuple(rule.sources)
    else:
        inputs = (rule.source,)
    return targets, inputs


def _forward_op(rule: Rule) -> ops.Op:
    """The typed op a rule's steps carry (its parameters are bound in the table, not by the matched key)."""
    names = set(_PLACEHOLDER.findall(parse_ref(rule.primary)[1]))
    step = rule.make_step({n: "0" for n in names})
    assert step.op is not None
    return step.op


def inverse_op(op: ops.Op) -> tuple[ops.Op, bool]:
    """(the op taking the forward op's outputs back to its trained input, whether that input is a LoRA-merged
    layer). A LoRA merge inverts to the merged weight itself (identity); a chain inverts op by op, in reverse."""
    if isinstance(op, ops.Chain):
        merged = isinstance(op.chain[0], ops.LoraMerge)
        rest = op.chain[1:] if merged else op.chain
        inverses = [inverse_op(o)[0] for o in reversed(rest)]
        if not inverses:
            return ops.Identity("rename"), merged
        return (inverses[0] if len(inverses) == 1 else ops.Chain(*inverses)), merged
    if isinstance(op, ops.LoraMerge):
        return ops.Identity("rename"), True
    if isinstance(op, ops.Identity):
        return ops.Identity("rename"), False
    if isinstance(op, ops.Split):
        return ops.Concat(op.dim), False
    if isinstance(op, ops.GroupedQkvSplit):
        return ops.GroupedQkvConcat(op.num_heads, op.num_kv_heads), False
    raise NotInvertible(f"op {op.describe()} has no inverse")


def training_key(pattern: str, renames: Sequence[tuple[str, str]]) -> str:
    key = parse_ref(pattern)[1]
    for old, new in renames:
        key = key.replace(old, new)
    return key


def invert(layout: TrainingLayout, export: str = EXPORT) -> list[Rule]:
    """The inverse table: export tensors -> the training checkpoint's trained tensors (renamed), then every other
    export tensor dropped as frozen. Equal inverse rules (a table's alternatives for older checkpoints, e.g. a
    trained copy under two possible names) appear once."""
    out: list[Rule] = []
    for rule in layout.rules:
        if isinstance(rule, (Rename, Take, LoraMerge, Split, Concat, Duplicate, Apply, CopyRest)):
            targets, inputs = _io_patterns(rule)
        else:
            continue  # drops produce nothing
        trained = [i for i in inputs if parse_ref(i)[0] == layout.source]
        if not trained:
            continue  # frozen: built again from the other inputs
        if isinstance(rule, CopyRest):
            raise NotInvertible(f"{rule.describe()} copies the training checkpoint's leftovers: no inverse")
        fwd = _forward_op(rule)
        inv, merged = inverse_op(fwd)
        if merged:
            # the merged weight is the layer's weight, named after the layer's adapter ``A`` tensor (a LoRA merge's
            # inputs are always base weight, ``A``, ``B``)
            outs = (training_key(inputs[1], layout.renames),)
        else:
            if len(trained) != len(inputs):
                raise NotInvertible(f"{rule.describe()} mixes the training checkpoint with other inputs")
            outs = tuple(training_key(i, layout.renames) for i in inputs)
        if len(outs) != 1:
            raise NotInvertible(f"{rule.describe()} reads several trained tensors: no inverse")
        srcs = tuple(f"{export}:{t}" for t in targets)
        optional = bool(getattr(rule, "optional", False))
        if isinstance(inv, ops.Identity) and len(srcs) == 1:
            new: Rule = Rename(target=outs[0], source=srcs[0], optional=optional)
        else:
            new = Apply(targets=outs, sources=srcs, op=inv, optional=optional)
        if not any(_same(new, r) for r in out):
            out.append(new)
    out.append(DropRest(f"{export}:{{rest}}", reason=layout.frozen_reason, optional=True))
    return out


def _same(a: Rule, b: Rule) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, Apply):
        return (a.targets, a.sources, type(a.op), vars(a.op)) == (b.targets, b.sources, type(b.op), vars(b.op))
    return a == b


# --------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------
@dataclass
class BackResult:
    family: str
    plan: Plan
    out: Path | None
    summary: str
    tensors: int
    dropped: int
    notes: list[str] = field(default_factory=list)


def convert_hf_to_mmengine(folder: str | Path, *, out: str | Path | None, dtype: str | None = None,
                           dry_run: bool = False, overwrite: bool = False, allow_unsafe_pickle: bool = False,
                           progress: bool = True, **inputs) -> BackResult:
    """A maskport export folder (or a released folder a family imports: it is converted to a native export first,
    in a temporary folder beside ``out``) -> the ``.pth`` the family's training code loads as pretrained weights.

    The ``.pth`` is a plain ``{name: tensor}`` dict of the trained tensors (LoRA merged into the layers' weights)
    under the names the training code has before it wraps adapters; the frozen parts are left to the run's other
    inputs. ``dtype``: of the floating tensors (default: the export's). ``inputs``: those of the released folder's
    import command, for a released folder only."""
    from ..families import detect_released_family, family_for_model_type
    from ..families._common import read_json
    from .api import DTYPES, _training_dtype
    from .sources import open_hf_folder

    t0 = time.time()
    src_dir = Path(folder)
    if not src_dir.is_dir():
        raise MissingInput(f"export folder {src_dir} does not exist (or is not a folder)")
    if not dry_run and out is None:
        raise MissingInput("-o/--out is required (or use --dry-run)")
    out_path = Path(out) if out is not None else None
    if dtype is not None and dtype not in DTYPES:
        raise MissingInput(f"--dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    if out_path is not None:
        from ..io import check_output_apart

        check_output_apart(out_path, [src_dir, *(v for v in inputs.values() if isinstance(v, (str, Path)))])
        if out_path.is_dir():
            raise MissingInput(f"output {out_path} is a folder; give a file name (e.g. {out_path / 'model.pth'})")
        if out_path.exists() and not overwrite and not dry_run:
            raise MissingInput(f"output file {out_path} already exists; pass --overwrite to replace it")
    cfg = read_json(src_dir / "config.json")
    if cfg.get("quantization_config"):
        qc = cfg["quantization_config"]
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise MissingInput(f"{src_dir} is a quantized export ({method}): its weights cannot go back to training; "
                           "convert the unquantized export it was made from")
    fam = family_for_model_type(cfg.get("model_type"))
    if fam is None:
        try:
            released = detect_released_family(src_dir, cfg)
        except WrongFamily:
            raise WrongFamily(f"{src_dir}: model_type {cfg.get('model_type')!r} is neither a maskport export nor a "
                              "released folder a family imports") from None
        return _via_native(src_dir, released, out_path, dtype=dtype, dry_run=dry_run, overwrite=overwrite,
                           allow_unsafe_pickle=allow_unsafe_pickle, progress=progress, **inputs)
    given = sorted(k for k, v in inputs.items() if v is not None)
    if given:
        raise MissingInput(f"{', '.join('--' + k.replace('_', '-') for k in given)}: only for a released folder; "
                           f"{src_dir} is already an export of family {fam.name}")
    layout = fam.training_layout(cfg)
    source = open_hf_folder(src_dir, name=EXPORT, allow_unsafe_pickle=allow_unsafe_pickle)
    try:
        try:
            table = invert(layout)
        except NotInvertible as exc:
            raise WrongFamily(f"family {fam.name}: its table cannot be inverted ({exc})") from None
        out_dtype = DTYPES[dtype] if dtype else _training_dtype(source)
        plan = build_plan(table, {EXPORT: source}, out_dtype=out_dtype)
        notes = list(layout.notes)
        res = BackResult(fam.name, plan, None, format_table(plan), len(plan.targets), len(plan.drops), notes)
        if dry_run:
            return res
        assert out_path is not None
        _write(plan, source, out_path, overwrite, progress)
        res.out = out_path
        res.notes.append(f"{res.tensors} tensors written in {time.time() - t0:.1f} s")
        return res
    finally:
        source.close()


def _tensors(plan: Plan, source, bar):
    """Each target of the plan, computed one step at a time (only that step's tensors in memory)."""
    for ps in plan.steps:
        xs = [source.load(r.key) for r in ps.step.inputs]
        outs = ps.step.compute(xs)
        del xs
        for t, y, info in zip(ps.step.targets, outs, ps.output_infos):
            yield t, y.to(info.dtype)
            if bar:
                bar.update(info.nbytes)
        del outs


def _write(plan: Plan, source, out: Path, overwrite: bool, progress: bool) -> None:
    """Stream the plan's targets into a torch-format file (``io/torch_zip.py``: the pickle from shapes first, then
    each tensor's bytes), in a temporary file beside ``out`` renamed into place."""
    from ..io import atomic_output_file
    from ..io.torch_zip import save_tensors

    specs = [(t, info.dtype, tuple(info.shape)) for ps in plan.steps for t, info in zip(ps.step.targets,
                                                                                         ps.output_infos)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024, desc="writing tensors",
                   file=sys.stderr)
    try:
        with atomic_output_file(out, overwrite=overwrite) as tmp:
            save_tensors(tmp, specs, _tensors(plan, source, bar))
    finally:
        if bar:
            bar.close()


def _via_native(src_dir: Path, fam, out_path: Path | None, *, dtype, dry_run, overwrite, allow_unsafe_pickle,
                progress, **inputs) -> BackResult:
    """A released folder: import it to a native export in a hidden folder beside the output (for a dry run without
    ``-o``, in the system's temporary folder), convert that, and remove it."""
    import os
    import tempfile

    from .api import convert_released_folder

    where = out_path.parent if out_path is not None else Path(tempfile.gettempdir())
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f".{(out_path or src_dir).name}.maskport-native-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        convert_released_folder(src_dir, command=fam.spec.released_command, out=tmp, dtype=dtype,
                                allow_unsafe_pickle=allow_unsafe_pickle, progress=progress, **inputs)
        res = convert_hf_to_mmengine(tmp, out=out_path, dtype=dtype, dry_run=dry_run, overwrite=overwrite,
                                     allow_unsafe_pickle=allow_unsafe_pickle, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.notes.insert(0, f"{src_dir.name}: a released folder, imported with 'convert {fam.spec.released_command}' "
                        "first")
    return res


__all__ = ["EXPORT", "BackResult", "NotInvertible", "TrainingLayout", "convert_hf_to_mmengine", "invert",
           "inverse_op", "training_key"]
