"""Ops against independent computations: peft for the LoRA merge, torch/arithmetic for layout ops."""

import pytest
import torch

from maskport.convert import ops
from maskport.convert.rules import lora_scaling


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_merge_matches_peft_merge_and_unload(use_rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 7))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_rslora=use_rslora, lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    lin = pm.base_model.model[0]
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
    w = lin.base_layer.weight.detach().clone()
    a = lin.lora_A["default"].weight.detach().clone()
    b = lin.lora_B["default"].weight.detach().clone()
    merged = pm.merge_and_unload()[0].weight.detach()
    ours = ops.lora_merge(w, a, b, lora_scaling(8, 4, use_rslora))
    torch.testing.assert_close(ours, merged, rtol=0, atol=1e-6)


def test_lora_merge_is_computed_in_float32_from_bf16_inputs():
    torch.manual_seed(1)
    w, a, b = (torch.randn(s).bfloat16() for s in [(8, 16), (2, 16), (8, 2)])
    out = ops.lora_merge(w, a, b, 2.0)
    assert out.dtype == torch.float32
    expected = w.double() + 2.0 * (b.double() @ a.double())
    assert (out.double() - expected).abs().max() < 1e-5


def test_lora_merge_shapes_reject_mismatched_rank():
    with pytest.raises(ValueError, match="do not fit"):
        ops.lora_merge_shapes([(8, 16), (4, 16), (8, 2)])


def test_lora_merge_shapes_reject_wrong_in_features():
    with pytest.raises(ValueError, match="do not fit"):
        ops.lora_merge_shapes([(8, 16), (2, 15), (8, 2)])


def test_split_and_concat_are_inverse_and_shapes_agree():
    x = torch.arange(24.0).reshape(6, 4)
    parts = ops.split(x, [2, 3, 1], dim=0)
    assert [tuple(p.shape) for p in parts] == ops.split_shapes((6, 4), [2, 3, 1], 0)
    assert torch.equal(ops.concat(parts, 0), x)
    assert ops.concat_shapes([(2, 4), (3, 4), (1, 4)], 0) == (6, 4)
    assert torch.equal(parts[1], x[2:5])


def test_split_shapes_reject_bad_sizes():
    with pytest.raises(ValueError):
        ops.split_shapes((6, 4), [2, 2], 0)


def test_concat_shapes_reject_mismatched_other_dims():
    with pytest.raises(ValueError):
        ops.concat_shapes([(2, 4), (2, 5)], 0)


def test_reshape_shapes():
    assert ops.reshape_shapes((1, 1, 8), (8,)) == (8,)
    with pytest.raises(ValueError):
        ops.reshape_shapes((3,), (4,))


@pytest.mark.parametrize("block_bytes", [4 * 16, 4 * 16 * 7, 1 << 22])  # one row, 7 rows (uneven), all rows
def test_lora_merge_rows_matches_the_whole_matrix_merge(block_bytes):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(45, 16, generator=g).to(torch.bfloat16)
    a, b = torch.randn(4, 16, generator=g), torch.randn(45, 4, generator=g)
    whole = torch.addmm(w.float(), b, a, alpha=0.5)
    f32 = ops.lora_merge_rows(torch.empty(45, 16), w, a, b, 0.5, block_bytes=block_bytes)
    torch.testing.assert_close(f32, whole, rtol=0, atol=1e-5)
    # another output dtype gets the same float32 values, rounded; in place (out is w) too
    assert torch.equal(ops.lora_merge_rows(torch.empty(45, 16, dtype=torch.float16), w, a, b, 0.5,
                                           block_bytes=block_bytes), f32.half())
    w2 = w.clone()
    assert ops.lora_merge_rows(w2, w2, a, b, 0.5, block_bytes=block_bytes) is w2
    assert torch.equal(w2, f32.to(torch.bfloat16))


def test_lora_merge_rows_refuses_a_wrong_output():
    w = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="contiguous"):
        ops.lora_merge_rows(torch.zeros(3, 4).t(), w, torch.zeros(2, 3), torch.zeros(4, 2), 1.0)


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_lora_merge_rows_shared_out_between_threads_gives_the_same_bytes(workers):
    """Row blocks shared out between threads (the writer's executor): bit-identical to one thread, in place too,
    for a block count that does not divide evenly; a failing block's error reaches the caller after every thread
    is done."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(1)
    w = torch.randn(301, 64, generator=g).to(torch.bfloat16)
    a = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(301, 8, generator=g).to(torch.bfloat16)
    block = 4 * 64 * 10  # 10 rows a block: 31 blocks, the last one short
    one = ops.lora_merge_rows(torch.empty(301, 64), w, a, b, 1.7, block_bytes=block)
    with ThreadPoolExecutor(workers - 1) as ex:
        many = ops.lora_merge_rows(torch.empty(301, 64), w, a, b, 1.7, block_bytes=block, executor=ex, workers=workers)
        assert torch.equal(one.view(torch.int32), many.view(torch.int32))
        w2 = w.clone()
        ops.lora_merge_rows(w2, w2, a, b, 1.7, block_bytes=block, executor=ex, workers=workers)
        assert torch.equal(w2.view(torch.int16), one.to(torch.bfloat16).view(torch.int16))
        with pytest.raises(RuntimeError):  # B's rows do not fit A: every block's addmm fails
            ops.lora_merge_rows(torch.empty(301, 64), w, a, b[:, :4], 1.7, block_bytes=block, executor=ex,
                                workers=workers)


def test_lora_merge_rows_reports_the_blocks_holding_nan_or_inf():
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 16, generator=g).to(torch.bfloat16)
    a, b = torch.randn(4, 16, generator=g), torch.randn(50, 4, generator=g)
    found: list = []
    ops.lora_merge_rows(torch.empty(50, 16, dtype=torch.bfloat16), w, a, b, 0.5, block_bytes=4 * 16 * 10,
                        nonfinite=found)
    assert found == []
    w[13, 3], w[41, 0] = float("inf"), float("nan")  # blocks 1 and 4 (10 rows each)
    with ThreadPoolExecutor(1) as ex:
        for kw in ({}, {"executor": ex, "workers": 2}):
            found = []
            ops.lora_merge_rows(torch.empty(50, 16, dtype=torch.bfloat16), w, a, b, 0.5, block_bytes=4 * 16 * 10,
                                nonfinite=found, **kw)
            assert sorted(found) == [1, 4]
    # finite inputs whose merge exceeds the output dtype's range: found in the output dtype
    w2 = torch.full((20, 16), 60000.0)
    found = []
    ops.lora_merge_rows(torch.empty(20, 16, dtype=torch.float16), w2, torch.ones(4, 16), torch.ones(20, 4), 2000.0,
                        block_bytes=4 * 16 * 10, nonfinite=found)
    assert sorted(found) == [0, 1]
