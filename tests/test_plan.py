"""The planner refuses incomplete or inconsistent conversions before anything is written."""

import pytest
import torch

from maskport.convert.plan import build_plan
from maskport.convert.rules import Concat, CopyRest, Drop, LoraMerge, Rename, Split, Take, compile_pattern
from maskport.convert.sources import StateDictSource
from maskport.errors import PlanError


def src(name, **tensors):
    return StateDictSource(name, f"/{name}", {k.replace("__", "."): v for k, v in tensors.items()}, name)


def sources():
    base = src("base", layers__0__q__weight=torch.zeros(4, 3), layers__0__k__weight=torch.zeros(4, 3),
               norm__weight=torch.ones(3), head__weight=torch.zeros(5, 3))
    ckpt = src("ckpt", lora__layers__0__q__A=torch.zeros(2, 3), lora__layers__0__q__B=torch.zeros(4, 2),
               head__trained=torch.ones(5, 3), junk__weight=torch.ones(1))
    return {"base": base, "ckpt": ckpt}


RULES = [
    LoraMerge(target="layers.{i}.{p}.weight", base="base:layers.{i}.{p}.weight",
              a="ckpt:lora.layers.{i}.{p}.A", b="ckpt:lora.layers.{i}.{p}.B", scaling=2.0),
    Take(target="head.weight", source="ckpt:head.trained", replaces=("base:head.weight",)),
    Drop("ckpt:junk.weight", reason="not needed"),
    CopyRest(target="{rest}", source="base:{rest}"),
]
EXPECTED = {"layers.0.q.weight": (4, 3), "layers.0.k.weight": (4, 3), "norm.weight": (3,), "head.weight": (5, 3)}


def test_complete_plan_accounts_for_everything():
    plan = build_plan(RULES, sources(), out_dtype=torch.bfloat16, expected=EXPECTED)
    assert set(plan.targets) == set(EXPECTED)
    assert plan.targets["layers.0.q.weight"].dtype == torch.bfloat16
    dropped = {str(r): why for r, why in plan.drops}
    assert dropped["ckpt:junk.weight"] == "not needed"
    assert "base:head.weight" in dropped  # superseded, accounted for


def test_unaccounted_source_tensor_fails():
    with pytest.raises(PlanError, match="ckpt:junk.weight is unaccounted"):
        build_plan(RULES[:2] + RULES[3:], sources(), out_dtype=torch.float32, expected=EXPECTED)


def test_missing_target_fails():
    exp = dict(EXPECTED, **{"extra.weight": (1,)})
    with pytest.raises(PlanError, match="target extra.weight .* is missing"):
        build_plan(RULES, sources(), out_dtype=torch.float32, expected=exp)


def test_unexpected_target_fails():
    exp = {k: v for k, v in EXPECTED.items() if k != "norm.weight"}
    with pytest.raises(PlanError, match="norm.weight is not a tensor of the target model"):
        build_plan(RULES, sources(), out_dtype=torch.float32, expected=exp)


def test_shape_mismatch_names_tensor_and_both_shapes():
    exp = dict(EXPECTED, **{"head.weight": (6, 3)})
    with pytest.raises(PlanError, match=r"shape mismatch for head.weight: the rule gives \(5, 3\), the target model expects \(6, 3\)"):
        build_plan(RULES, sources(), out_dtype=torch.float32, expected=exp)


def test_duplicate_target_fails():
    rules = RULES + [Rename(target="norm.weight", source="ckpt:junk.weight")]
    with pytest.raises(PlanError, match="produced twice|claimed by two rules"):
        build_plan(rules, sources(), out_dtype=torch.float32)


def test_missing_input_of_a_rule_fails():
    s = sources()
    s["ckpt"] = src("ckpt", lora__layers__0__q__A=torch.zeros(2, 3), head__trained=torch.ones(5, 3),
                    junk__weight=torch.ones(1))
    with pytest.raises(PlanError, match="needs ckpt:lora.layers.0.q.B, which is missing"):
        build_plan(RULES, s, out_dtype=torch.float32)


def test_lora_shape_inconsistency_is_reported():
    s = sources()
    s["ckpt"] = src("ckpt", lora__layers__0__q__A=torch.zeros(2, 3), lora__layers__0__q__B=torch.zeros(4, 3),
                    head__trained=torch.ones(5, 3), junk__weight=torch.ones(1))
    with pytest.raises(PlanError, match="LoRA shapes do not fit"):
        build_plan(RULES, s, out_dtype=torch.float32)


def test_rule_matching_nothing_fails_unless_optional():
    rules = RULES + [Rename(target="x", source="ckpt:does.not.exist")]
    with pytest.raises(PlanError, match="matched no tensor"):
        build_plan(rules, sources(), out_dtype=torch.float32)
    rules = RULES + [Rename(target="x", source="ckpt:does.not.exist", optional=True)]
    build_plan(rules, sources(), out_dtype=torch.float32)


def test_all_problems_are_listed_together():
    exp = dict(EXPECTED, **{"head.weight": (6, 3), "extra": (1,)})
    with pytest.raises(PlanError) as ei:
        build_plan(RULES[:2] + RULES[3:], sources(), out_dtype=torch.float32, expected=exp)
    assert len(ei.value.problems) == 3


def test_split_and_concat_rules_plan_shapes():
    s = {"a": src("a", qkv=torch.zeros(9, 2), p0=torch.zeros(1, 2), p1=torch.zeros(1, 2))}
    rules = [Split(targets=("q", "k", "v"), source="a:qkv", dim=0),
             Concat(target="pts", sources=("a:p0", "a:p1"), dim=0)]
    plan = build_plan(rules, s, out_dtype=torch.float32,
                      expected={"q": (3, 2), "k": (3, 2), "v": (3, 2), "pts": (2, 2)})
    assert plan.targets["pts"].shape == (2, 2)


def test_integer_tensors_keep_their_dtype():
    s = {"a": src("a", ids=torch.arange(3), w=torch.zeros(2))}
    plan = build_plan([CopyRest(target="{rest}", source="a:{rest}")], s, out_dtype=torch.bfloat16)
    assert plan.targets["ids"].dtype == torch.int64 and plan.targets["w"].dtype == torch.bfloat16


def test_pattern_placeholders():
    rx = compile_pattern("layers.{i}.{rest}.weight")
    assert rx.match("layers.3.self_attn.q_proj.weight").groupdict() == {"i": "3", "rest": "self_attn.q_proj"}
    assert rx.match("layers.3.weight") is None
    assert compile_pattern("a.{i}.b").match("a.1.2.b") is None


def test_drop_if_equal_checks_values_before_anything_is_written():
    """A copy (e.g. a buffer DeepSpeed kept) is dropped only if it equals its original: bit-equal, or the original
    rounded to bf16/fp16 in the copy's dtype. A difference is a one-line ValueMismatch naming both; a copy without
    counterpart is a plan problem; the original is only read (its own rule still claims it)."""
    from maskport.convert.rules import DropIfEqual
    from maskport.errors import ValueMismatch

    g = torch.randn(3, 4)
    rules = [Rename("w", "base:w"), Rename("g", "base:g"),
             DropIfEqual("ckpt:enc.{rest}", equals="base:{rest}", reason="frozen copy")]

    def run(copy, **extra):
        return build_plan(rules, {"base": src("base", w=torch.ones(2), g=g),
                                  "ckpt": src("ckpt", enc__g=copy, **extra)}, out_dtype=torch.float32)

    for ok in (g.clone(), g.bfloat16(), g.bfloat16().float(), g.half()):
        plan = run(ok)
        assert [(str(r), reason) for r, reason in plan.drops] == [
            ("ckpt:enc.g", "frozen copy (values checked equal to the 'base' copy)")]
        assert {str(k): str(v) for k, v in plan.checked_equal.items()} == {"ckpt:enc.g": "base:g"}
    with pytest.raises(ValueMismatch) as exc:
        run(g + 1e-3)
    assert "ckpt:enc.g should duplicate base:g" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueMismatch, match="another shape"):
        run(torch.zeros(4, 3))
    with pytest.raises(PlanError, match="ckpt:enc.extra has no counterpart base:extra"):
        run(g.clone(), enc__extra=torch.zeros(1))
    # ordinary rules claim first: a tensor an ordinary rule uses is not re-checked
    optional = DropIfEqual("ckpt:enc.{rest}", equals="base:{rest}", reason="frozen copy", optional=True)
    plan = build_plan([Rename("d", "ckpt:enc.g"), *rules[:2], optional], {"base": src("base", w=torch.ones(2), g=g),
                                                             "ckpt": src("ckpt", enc__g=g + 1)}, out_dtype=torch.float32)
    assert plan.checked_equal == {}
