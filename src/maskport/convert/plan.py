"""Rules x sources -> a validated plan, from names, shapes and dtypes alone (no tensor data read).

Steps:
1. expand every ordinary rule against the keys of its source;
2. record which source tensors each step reads or supersedes; a tensor claimed twice is an error;
3. expand :class:`~maskport.convert.rules.CopyRest` rules over the tensors nobody claimed;
4. any source tensor still unclaimed is an error (unaccounted);
5. compute every output shape with the ops' shape functions (inconsistent inputs are errors);
6. compare the targets with the shapes the target model expects: missing, unexpected, duplicated or
   mis-shaped targets are errors.
All problems are collected and raised together as :class:`~maskport.errors.PlanError` before anything
is written.
7. only then, the one check that reads tensor data: each :class:`~maskport.convert.rules.DropIfEqual` drop (small
   buffers, in practice) is compared with the tensor it duplicates; a difference raises
   :class:`~maskport.errors.ValueMismatch` naming it, still before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import PlanError, ValueMismatch
from .rules import Ref, Rule, Step, parse_ref
from .sources import TensorInfo, TensorSource


@dataclass
class PlannedStep:
    step: Step
    input_infos: list[TensorInfo]
    output_infos: list[TensorInfo]  # in the output dtype


@dataclass
class Plan:
    steps: list[PlannedStep]                 # steps that produce targets, in write order
    drops: list[tuple[Ref, str]]             # (source tensor, reason) for drops and superseded tensors
    sources: dict[str, TensorSource]
    out_dtype: torch.dtype
    checked_equal: dict[Ref, Ref] = field(default_factory=dict)  # DropIfEqual: dropped copy -> checked original

    @property
    def targets(self) -> dict[str, TensorInfo]:
        return {t: info for ps in self.steps for t, info in zip(ps.step.targets, ps.output_infos)}

    def used_sources(self) -> dict[Ref, list[str]]:
        used: dict[Ref, list[str]] = {}
        for ps in self.steps:
            for r in ps.step.inputs:
                used.setdefault(r, []).extend(ps.step.targets)
        return used

    def total_bytes(self) -> int:
        return sum(i.nbytes for ps in self.steps for i in ps.output_infos)

    def largest_tensor_bytes(self) -> int:
        return max((i.nbytes for ps in self.steps for i in ps.output_infos), default=0)


def _out_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype, op) -> torch.dtype:
    if in_dtype.is_floating_point or op.float_output:
        return out_dtype
    return in_dtype


def build_plan(
    rules: Sequence[Rule],
    sources: Mapping[str, TensorSource],
    *,
    out_dtype: torch.dtype,
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> Plan:
    """Expand ``rules`` over ``sources`` and validate the result. Raises :class:`PlanError` listing every
    problem found; returns a :class:`Plan` whose every source tensor is used or dropped with a reason."""
    problems: list[str] = []

    def keys_of(name: str) -> list[str]:
        if name not in sources:
            raise KeyError(name)
        return sources[name].keys()

    claimed: dict[Ref, str] = {}
    steps: list[Step] = []

    def claim(ref: Ref, by: str) -> None:
        if ref in claimed and claimed[ref] != by:
            problems.append(f"{ref} is claimed by two rules: {claimed[ref]} and {by}")
        claimed.setdefault(ref, by)

    def run_rule(rule: Rule, only_unclaimed: bool) -> None:
        src_name = parse_ref(rule.primary)[0]
        if src_name not in sources:
            if not rule.optional:
                problems.append(f"rule {rule.describe()} reads source '{src_name}', which was not given")
            return
        n = 0
        keys = (lambda s: [k for k in keys_of(s) if Ref(s, k) not in claimed]) if only_unclaimed else keys_of
        for step in rule.expand(keys):
            n += 1
            label = f"{type(rule).__name__}->{step.targets[0] if step.targets else 'drop'}"
            for ref in (*step.inputs, *step.superseded):
                if ref.source not in sources or ref.key not in sources[ref.source]:
                    problems.append(f"{label}: needs {ref}, which is missing")
                else:
                    claim(ref, label)
            eq = step.equals
            if eq is not None and (eq.source not in sources or eq.key not in sources[eq.source]):
                problems.append(f"{step.superseded[0]} has no counterpart {eq} to be checked against "
                                "(a tensor the training run changed? no rule uses it)")
            steps.append(step)
        if n == 0 and not rule.optional:
            problems.append(f"rule {rule.describe()} matched no tensor in '{src_name}' (checkpoint of another family?)")

    ordinary = [r for r in rules if not r.claims_rest]
    rest = [r for r in rules if r.claims_rest]
    for r in ordinary:
        run_rule(r, only_unclaimed=False)
    for r in rest:
        run_rule(r, only_unclaimed=True)

    for name, src in sources.items():
        unaccounted = [k for k in src.keys() if Ref(name, k) not in claimed]
        for k in unaccounted[:50]:
            problems.append(f"{name}:{k} is unaccounted for (no rule uses or drops it)")
        if len(unaccounted) > 50:
            problems.append(f"... and {len(unaccounted) - 50} more unaccounted tensors in '{name}'")

    planned: list[PlannedStep] = []
    drops: list[tuple[Ref, str]] = []
    produced: dict[str, str] = {}
    for step in steps:
        for ref in step.superseded:
            drops.append((ref, step.reason or "dropped"))
        if not step.targets:
            continue
        try:
            infos = [sources[r.source].info(r.key) for r in step.inputs]
        except KeyError:
            continue  # already reported as missing
        try:
            shapes = step.shapes([i.shape for i in infos])
        except ValueError as exc:
            problems.append(f"{', '.join(step.targets)}: {exc}")
            continue
        if len(shapes) != len(step.targets):
            problems.append(f"{step.op_name} gives {len(shapes)} tensors for {len(step.targets)} targets")
            continue
        dtype = _out_dtype(infos[0].dtype, out_dtype, step.op)
        outs = [TensorInfo(tuple(s), dtype) for s in shapes]
        for t in step.targets:
            if t in produced:
                problems.append(f"target {t} is produced twice: by {produced[t]} and by {step.op_name} of {step.inputs[0]}")
            produced[t] = f"{step.op_name} of {step.inputs[0]}"
        planned.append(PlannedStep(step, infos, outs))

    if expected is not None:
        got = {t: info.shape for ps in planned for t, info in zip(ps.step.targets, ps.output_infos)}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        for t in missing[:50]:
            problems.append(f"target {t} {tuple(expected[t])} is missing: no rule produces it")
        if len(missing) > 50:
            problems.append(f"... and {len(missing) - 50} more missing targets")
        for t in unexpected[:50]:
            problems.append(f"target {t} is not a tensor of the target model")
        for t in sorted(set(got) & set(expected)):
            if tuple(got[t]) != tuple(expected[t]):
                problems.append(f"shape mismatch for {t}: the rule gives {tuple(got[t])}, "
                                f"the target model expects {tuple(expected[t])}")

    if problems:
        raise PlanError(problems)
    checked = {step.superseded[0]: step.equals for step in steps if step.equals is not None}
    for copy, original in checked.items():
        check_duplicate(sources, copy, original)
    return Plan(planned, drops, dict(sources), out_dtype, checked)


_ROUNDINGS = (torch.bfloat16, torch.float16)


def check_duplicate(sources: Mapping[str, TensorSource], copy: Ref, original: Ref) -> None:
    """Raise :class:`ValueMismatch` unless ``copy`` holds ``original``'s values: bit-equal in ``copy``'s dtype, or
    equal to ``original`` rounded to a training dtype (bfloat16, float16) and stored in ``copy``'s dtype."""
    a_info, b_info = sources[copy.source].info(copy.key), sources[original.source].info(original.key)
    if tuple(a_info.shape) != tuple(b_info.shape):
        raise ValueMismatch(f"{copy} {tuple(a_info.shape)} should duplicate {original} but has another shape "
                            f"{tuple(b_info.shape)}; nothing was written")
    a = sources[copy.source].load(copy.key)
    b = sources[original.source].load(original.key)
    if a.dtype.is_floating_point and b.dtype.is_floating_point:
        candidates = [b.to(a.dtype)] + [b.to(d).to(a.dtype) for d in _ROUNDINGS if d != a.dtype]
    else:
        candidates = [b.to(a.dtype)] if a.dtype == b.dtype else []
    if any(torch.equal(a, c) for c in candidates):
        return
    detail = ""
    if a.dtype.is_floating_point and b.dtype.is_floating_point:
        diff = (a.double() - b.double()).abs()
        detail = f" (max abs difference {diff.max().item():.3g} over {int((diff > 0).sum())} of {diff.numel()} values)"
    elif a.dtype != b.dtype:
        detail = f" (dtype {str(a.dtype).replace('torch.', '')} vs {str(b.dtype).replace('torch.', '')})"
    raise ValueMismatch(f"{copy} should duplicate {original} but holds other values{detail}: the checkpoint "
                        f"was not trained from this {original.source} input, or changed that tensor; nothing was "
                        "written")
