"""The coverage / provenance report: every source tensor -> what became of it; every target -> where it
came from; the output shards with their sha256."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .plan import Plan
from .rules import Ref


def coverage(plan: Plan) -> dict[str, Any]:
    used = plan.used_sources()
    dropped = {ref: reason for ref, reason in plan.drops}
    per_source: dict[str, dict[str, int]] = {}
    unaccounted = []
    for name, src in plan.sources.items():
        c = Counter()
        for k in src.keys():
            ref = Ref(name, k)
            if ref in used:
                c["used"] += 1
            elif ref in dropped:
                c["dropped"] += 1
            else:
                c["unaccounted"] += 1
                unaccounted.append(str(ref))
        per_source[name] = {"tensors": len(src.keys()), "used": c["used"], "dropped": c["dropped"],
                            "unaccounted": c["unaccounted"]}
    ops = Counter(ps.step.op_name.split("(")[0] for ps in plan.steps)
    return {
        "sources": per_source,
        "targets": len(plan.targets),
        "ops": dict(sorted(ops.items())),
        "unaccounted": unaccounted,
        "drop_reasons": dict(sorted(Counter(reason for _, reason in plan.drops).items())),
    }


def plan_entries(plan: Plan) -> tuple[list[dict], list[dict]]:
    targets = []
    for ps in plan.steps:
        for name, info in zip(ps.step.targets, ps.output_infos):
            targets.append({
                "target": name,
                "op": ps.step.op_name,
                "sources": [str(r) for r in ps.step.inputs],
                "source_dtypes": [str(i.dtype).replace("torch.", "") for i in ps.input_infos],
                "shape": list(info.shape),
                "dtype": str(info.dtype).replace("torch.", ""),
                **({"supersedes": [str(r) for r in ps.step.superseded]} if ps.step.superseded else {}),
            })
    drops = []
    superseded_by = {}
    for ps in plan.steps:
        for r in ps.step.superseded:
            superseded_by[r] = ps.step.targets[0]
    for ref, reason in plan.drops:
        entry = {"source": str(ref), "reason": reason}
        if ref in superseded_by:
            entry["superseded_by"] = superseded_by[ref]
        if ref in plan.checked_equal:
            entry["checked_equal_to"] = str(plan.checked_equal[ref])
        drops.append(entry)
    return targets, drops


def format_table(plan: Plan) -> str:
    """A short human-readable summary: per source, used/dropped/unaccounted; ops; output size."""
    cov = coverage(plan)
    lines = [f"{'source':<8} {'tensors':>8} {'used':>8} {'dropped':>8} {'unaccounted':>12}  file"]
    for name, c in cov["sources"].items():
        lines.append(f"{name:<8} {c['tensors']:>8} {c['used']:>8} {c['dropped']:>8} {c['unaccounted']:>12}  "
                     f"{plan.sources[name].path}")
    ops = ", ".join(f"{k} x{v}" for k, v in cov["ops"].items())
    gib = plan.total_bytes() / 2**30
    lines.append(f"targets: {cov['targets']} tensors, {gib:.3f} GiB in {str(plan.out_dtype).replace('torch.', '')}; "
                 f"ops: {ops}")
    if cov["drop_reasons"]:
        lines.append("dropped:")
        for reason, n in cov["drop_reasons"].items():
            lines.append(f"  {n:>5} x {reason}")
    return "\n".join(lines)
