"""``maskport verify``: the gate that compares the masks of two exports, and its report.

Real exports of the tiny fixture (the same weights; the same weights with one mask-decoder tensor perturbed) must
pass and fail; GT metrics are checked against values computed by hand on small masks; two gloo processes must
write the same report as one.
"""

from __future__ import annotations

import html.parser
import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from maskport.verify import InMemoryModel, Thresholds, load_image_folder, load_jsonl, load_refcoco, verify
from maskport import rle
from maskport.verify.coco import (
    polygons_to_mask,
    segmentation_to_mask,
)
from maskport.verify.command import verify_command
from maskport.verify.metrics import distribution, edit_distance
from maskport.verify.samples import Sample

FORCE_SEG = {"sequence_bias": {"[SEG]": 30.0}}  # the fixture model is untrained: make it say [SEG]
FORCE_SEG_JSON = json.dumps(FORCE_SEG)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models are faster so on a shared 2-core machine, and the one-process run
    uses the same thread count as each of the two gloo workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _image(h, w, seed):
    """A smooth picture with a red box (readable overlays), slightly noisy."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([90 + 80 * xx / w, 120 + 60 * yy / h, 170 - 50 * xx / w], axis=-1)
    arr += rng.randn(h, w, 3) * 6
    arr[h // 4: 3 * h // 4, w // 5: 3 * w // 5] = [215, 40, 40]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write_jsonl(root: Path, entries: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


@pytest.fixture(scope="module")
def samples_jsonl(tmp_path_factory):
    """Three samples with GT (the red box), two sizes, relative paths."""
    root = tmp_path_factory.mktemp("verify_samples")
    (root / "img").mkdir()
    (root / "gt").mkdir()
    entries = []
    for i, (h, w) in enumerate([(84, 112), (96, 96), (70, 120)]):
        _image(h, w, i).save(root / "img" / f"{i}.png")
        gt = np.zeros((h, w), np.uint8)
        gt[h // 4: 3 * h // 4, w // 5: 3 * w // 5] = 255
        Image.fromarray(gt).save(root / "gt" / f"{i}.png")
        entries.append({"id": f"box{i}", "image": f"img/{i}.png", "gt_mask": f"gt/{i}.png",
                        "prompt": "<image>Please segment the red box."})
    return _write_jsonl(root, entries)


def _small_images(export: Path) -> None:
    """Let the Qwen image processor keep small images small (a handful of image tokens): fast tests."""
    cfg = json.loads((export / "config.json").read_text())
    cfg["image_processor"].update(min_pixels=3136, max_pixels=50176)
    (export / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def exports(export_fp32, tmp_path_factory):
    """A: the fp32 export; B: A with one tensor of SAM2's mask decoder perturbed (the IoU head, which picks the
    mask among SAM2's multimask outputs)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("verify_exports")
    a, b = root / "A", root / "B"
    shutil.copytree(export_fp32.out_dir, a)
    _small_images(a)
    shutil.copytree(a, b)
    weights = load_file(str(b / "model.safetensors"))
    key = "sam2.mask_decoder.iou_prediction_head.proj_out.weight"
    t = weights[key]
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    weights[key] = (t.float() + 20.0 * t.float().std() * noise).to(t.dtype)
    save_file(weights, str(b / "model.safetensors"), metadata={"format": "pt"})
    return a, b


def _cli(*args):
    return CliRunner().invoke(verify_command, [str(a) for a in args])


@pytest.fixture(scope="module")
def ab_report(exports, samples_jsonl, tmp_path_factory):
    """``maskport verify A B`` once, in one process; several tests read it."""
    a, b = exports
    out = tmp_path_factory.mktemp("verify_reports") / "ab"
    r = _cli(a, b, "--samples", samples_jsonl, "--report", out, "--device", "cpu", "--max-new-tokens", 3,
             "--generation-kwargs", FORCE_SEG_JSON, "--no-progress")
    return r, out


# ------------------------------------------------------------------------------------------------ end to end


def test_same_export_passes_with_dice_one(exports, samples_jsonl, tmp_path):
    a, _ = exports
    r = _cli(a, a, "--samples", samples_jsonl, "--report", tmp_path / "aa", "--device", "cpu",
             "--max-new-tokens", 3, "--generation-kwargs", FORCE_SEG_JSON, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "verdict: PASS" in r.output
    rep = json.loads((tmp_path / "aa" / "report.json").read_text())
    s = rep["summary"]
    assert rep["verdict"] == "pass" and rep["failures"] == [] and rep["exit_code"] == 0
    assert s["dice"]["mean"] == s["dice"]["min"] == 1.0 and s["iou"]["min"] == 1.0
    assert s["max_abs_dprob"]["max"] == 0.0
    assert s["text_mismatch_rate"] == 0.0 and s["seg_count_agreement_rate"] == 1.0
    assert s["gt"]["giou_drop"] == 0.0 and s["gt"]["ref"] == s["gt"]["cand"]
    # not trivially 1: every sample has real, non-empty masks from both models
    for rec in rep["samples"]:
        assert rec["ref"]["n_masks"] >= 1 and "[SEG]" in rec["ref"]["answer"]
        assert all(p["ref_area"] > 0 and p["ref_present"] and p["cand_present"] for p in rec["pairs"])
    assert rep["models"]["ref"]["config_sha256"] == rep["models"]["cand"]["config_sha256"]
    assert rep["settings"]["generation_kwargs"] == FORCE_SEG


def test_perturbed_mask_decoder_fails_with_exit_1(ab_report, exports):
    r, out = ab_report
    assert r.exit_code == 1, r.output
    assert "verdict: FAIL" in r.output and "failed: min_dice" in r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["verdict"] == "fail" and rep["exit_code"] == 1
    names = [f.split(":")[0] for f in rep["failures"]]
    assert "min_dice" in names
    assert rep["summary"]["dice"]["mean"] < 0.9
    # the LLM is the same: the answers agree, the masks do not
    assert rep["summary"]["text_mismatch_rate"] == 0.0
    assert rep["summary"]["max_abs_dprob"]["max"] > 0.01
    assert rep["thresholds"] == {"min_dice": 0.95, "max_giou_drop": 0.02, "max_text_mismatch": 0.10}
    assert {g["name"] for g in rep["gates"]} == {"min_dice", "max_giou_drop", "max_text_mismatch"}
    # worst samples first
    dices = [s["dice"] for s in rep["samples"]]
    assert dices == sorted(dices)
    assert rep["models"]["ref"]["path"] == str(exports[0].resolve())


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.text, self.tables, self.scripts = [], [], [], 0, 0
        self.external = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "table":
            self.tables += 1
        if tag in ("script", "iframe"):
            self.scripts += 1
        for k in ("src", "href"):
            if str(a.get(k, "")).startswith(("http:", "https:", "//")):
                self.external.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_renders_with_overlays(ab_report):
    _, out = ab_report
    page = _Page()
    page.feed((out / "index.html").read_text())
    text = " ".join(" ".join(page.text).split())
    assert text.index("FAIL") < text.index("Summary") < text.index("Worst samples")  # verdict first
    assert "min_dice" in text and "Dice REF vs CAND" in text and "gIoU" in text and "cIoU" in text
    assert page.tables >= 4 and page.scripts == 0 and page.external == []
    assert page.imgs, "no overlays"
    for src in page.imgs:
        assert not src.startswith("/") and (out / src).is_file(), src
        with Image.open(out / src) as im:
            assert im.format == "PNG" and max(im.size) == 320
    rep = json.loads((out / "report.json").read_text())
    kinds = {Path(s).stem.split("_")[1] for s in page.imgs}
    assert {"image", "ref0", "cand0", "gt", "diff0"} <= kinds
    assert {o["index"] for o in rep["overlays"]} == {s["index"] for s in rep["samples"]}  # 3 samples: all drawn
    for link in page.links:
        assert link.startswith("#s") or (out / link).is_file(), link


def test_a_failing_worker_process_gives_one_error_not_a_hang(exports, samples_jsonl, tmp_path):
    from maskport.verify.api import VerifyRunError

    _, b = exports
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "nothing-like-this"}')
    t0 = time.perf_counter()
    with pytest.raises(VerifyRunError, match="could not load REF") as err:
        verify(broken, b, samples_jsonl, device="cpu", num_processes=2, progress=False)
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 120
    assert not (tmp_path / "report.json").exists()


def test_two_gloo_processes_write_the_same_report(ab_report, exports, samples_jsonl, tmp_path):
    _, out1 = ab_report
    a, b = exports
    t0 = time.perf_counter()
    res = verify(a, b, samples_jsonl, report_dir=tmp_path / "ab2", device="cpu", max_new_tokens=3,
                 generation_kwargs=FORCE_SEG, num_processes=2, progress=False)
    assert time.perf_counter() - t0 < 120
    one = json.loads((out1 / "report.json").read_text())
    two = json.loads((tmp_path / "ab2" / "report.json").read_text())
    assert res.report == two and res.exit_code == 1
    assert two["run"]["num_processes"] == 2 and two["run"]["backend"] == "gloo"
    assert sorted(p["index"] for p in two["run"]["per_sample_seconds"]) == [0, 1, 2]
    one.pop("run"), two.pop("run")
    assert one == two
    assert sorted(p.name for p in (tmp_path / "ab2" / "images").iterdir()) == \
        sorted(p.name for p in (out1 / "images").iterdir())


class _DropMasks:
    """A real model whose masks get lost (e.g. a deployment wrapper bug)."""

    def __init__(self, model):
        self.model = model

    def predict_forward(self, **kw):
        out = self.model.predict_forward(**kw)
        return {**out, "prediction_masks": [], "prediction_probabilities": []}


def test_model_that_returns_no_masks_is_flagged(exports, samples_jsonl, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    a, _ = exports
    model = AutoModel.from_pretrained(a, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(a, trust_remote_code=True)
    samples = load_jsonl(samples_jsonl)[:2]
    res = verify(a, InMemoryModel(_DropMasks(model), tok, label="drops masks"), samples, max_new_tokens=3,
                 generation_kwargs=FORCE_SEG, progress=False, report_dir=tmp_path / "nomask")
    assert res.exit_code == 1 and not res.passed
    assert res.summary["no_mask"] == {"ref": 0, "cand": 2}
    assert res.summary["flags"]["cand_no_mask"] == 2
    for rec in res.samples:
        assert "cand_no_mask" in rec["flags"] and "seg_count_mismatch" in rec["flags"]
        assert rec["cand"]["n_masks"] == 0 and rec["ref"]["n_masks"] >= 1
        # counted as empty masks, never skipped: one pair per REF mask, each Dice 0 against the empty mask
        assert len(rec["pairs"]) == rec["ref"]["n_masks"] and rec["dice"] == 0.0
        assert rec["cand"]["gt"]["iou"] == 0.0 and rec["cand"]["gt"]["intersection"] == 0
    assert res.summary["gt"]["cand"]["giou"] == 0.0
    page = (tmp_path / "nomask" / "index.html").read_text()
    assert "cand_no_mask" in page and "no mask" in page and "drops masks" in page


# ------------------------------------------------------------------------------------------------ hand-computed


class _Fixed:
    """A fake model: fixed answers and masks per prompt (no tokenizer needed)."""

    def __init__(self, outputs, probs=True, delay=0.0):
        self.outputs, self.probs, self.delay, self.calls = outputs, probs, delay, []

    def predict_forward(self, image, text, tokenizer=None, return_probabilities=False, generation_kwargs=None,
                        **kw):
        self.calls.append({"generation_kwargs": generation_kwargs, **kw})
        if self.delay:
            time.sleep(self.delay)
        answer, masks = self.outputs[text]
        masks = [np.asarray(m, dtype=bool)[None] for m in masks]
        out = {"prediction": answer, "prediction_masks": masks}
        if return_probabilities:
            out["prediction_probabilities"] = [m.astype(np.float32) * 0.75 + 0.125 for m in masks]
        return out


def _m(rows):
    return np.array([[c == "#" for c in r] for r in rows])


@pytest.fixture
def hand(tmp_path):
    """Two 4x4 samples with GT masks and fake models whose masks are drawn below."""
    gts = {
        "a": _m(["##..", "##..", "....", "...."]),   # 4 px
        "b": _m(["....", "....", "..##", "...#"]),   # 3 px
    }
    entries = []
    for k, gt in gts.items():
        Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(tmp_path / f"{k}.png")
        Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / f"{k}_gt.png")
        entries.append({"id": k, "image": f"{k}.png", "gt_mask": f"{k}_gt.png", "prompt": f"<image>{k}"})
    ref = _Fixed({
        "<image>a": ("Sure, [SEG].", [_m(["####", "....", "....", "...."])]),          # vs GT: I 2, U 6
        "<image>b": ("Sure, [SEG] and [SEG].", [_m(["....", "....", "..##", "...."]),  # vs GT: I 2, U 3
                                                _m(["#...", "....", "....", "...."])]),
    })
    cand = _Fixed({
        "<image>a": ("Sure, [SEG].", [_m(["##..", "##..", "....", "...."])]),          # = GT: I 4, U 4
        "<image>b": ("Sure.", []),                                                     # no mask: I 0, U 3
    })
    return _write_jsonl(tmp_path, entries), ref, cand


def test_gt_and_pair_metrics_match_hand_computed_values(hand):
    path, ref, cand = hand
    res = verify(InMemoryModel(ref, label="ref"), InMemoryModel(cand, label="cand"), path, progress=False,
                 thresholds=Thresholds(min_dice=0.5, max_giou_drop=0.5, max_text_mismatch=0.5))
    by_id = {r["id"]: r for r in res.samples}
    a, b = by_id["a"], by_id["b"]
    # sample a: REF top row (4 px) vs CAND = GT block (4 px): I 2, U 6
    assert a["iou"] == pytest.approx(2 / 6) and a["dice"] == pytest.approx(2 * 2 / 8)
    assert a["ref"]["gt"] == {"iou": pytest.approx(2 / 6), "dice": pytest.approx(4 / 8), "intersection": 2,
                              "union": 6}
    assert a["cand"]["gt"] == {"iou": 1.0, "dice": 1.0, "intersection": 4, "union": 4}
    assert a["max_abs_dprob"] == pytest.approx(0.75) and a["text_equal"] and a["flags"] == []
    # sample b: REF 2 masks, CAND none -> two pairs against empty masks, Dice 0 each; flagged
    assert [p["dice"] for p in b["pairs"]] == [0.0, 0.0] and b["dice"] == 0.0
    assert [(p["ref_present"], p["cand_present"]) for p in b["pairs"]] == [(True, False), (True, False)]
    assert b["max_abs_dprob"] is None
    assert set(b["flags"]) == {"cand_no_mask", "seg_count_mismatch", "text_mismatch", "multi_seg"}
    assert b["edit_distance"] == len(", [SEG] and [SEG]")  # "Sure, [SEG] and [SEG]." -> "Sure."
    assert b["ref"]["gt"]["iou"] == pytest.approx(2 / 3) and b["ref"]["gt"]["dice"] == pytest.approx(4 / 5)
    assert b["cand"]["gt"] == {"iou": 0.0, "dice": 0.0, "intersection": 0, "union": 3}
    assert b["ref"]["n_seg_tokens"] == 2 and b["cand"]["n_seg_tokens"] == 0
    s = res.summary
    gt = s["gt"]
    assert gt["ref"]["giou"] == pytest.approx((2 / 6 + 2 / 3) / 2)
    assert gt["ref"]["ciou"] == pytest.approx((2 + 2) / (6 + 3))
    assert gt["cand"]["giou"] == pytest.approx((1 + 0) / 2) and gt["cand"]["ciou"] == pytest.approx(4 / 7)
    assert gt["giou_drop"] == pytest.approx(0.5 - 0.5) and gt["ciou_drop"] == pytest.approx(4 / 9 - 4 / 7)
    assert gt["ref"]["mean_dice"] == pytest.approx((0.5 + 0.8) / 2)
    # distribution over the two sample Dice values 0 and 0.5: numpy's linear percentiles
    assert s["dice"] == {"n": 2, "mean": 0.25, "min": 0.0, "p5": pytest.approx(0.025), "p50": 0.25,
                         "p95": pytest.approx(0.475), "max": 0.5}
    assert s["text_mismatch_rate"] == 0.5 and s["seg_count_agreement_rate"] == 0.5
    assert s["mean_edit_distance"] == pytest.approx(len(", [SEG] and [SEG]") / 2)
    assert s["multi_seg"]["mask_pairs"] == 3 and s["multi_seg"]["pairs_missing_on_one_side"] == 2
    assert s["no_mask"] == {"ref": 0, "cand": 1}
    # gates: mean Dice 0.25 < 0.5 fails; gIoU drop 0 and text mismatch 0.5 pass
    assert [g["passed"] for g in res.gates] == [False, True, True]
    assert res.failures == ["min_dice: mean Dice REF vs CAND = 0.2500 < 0.5 (--min-dice)"]
    assert [r["id"] for r in res.samples] == ["b", "a"]  # worst first


def test_each_threshold_is_a_gate(hand):
    path, ref, cand = hand
    kw = {"progress": False}
    loose = Thresholds(min_dice=0.0, max_giou_drop=1.0, max_text_mismatch=1.0)
    assert verify(InMemoryModel(ref), InMemoryModel(cand), path, thresholds=loose, **kw).exit_code == 0
    r = verify(InMemoryModel(ref), InMemoryModel(cand), path, **kw,
               thresholds=Thresholds(min_dice=0.0, max_giou_drop=-0.1, max_text_mismatch=0.4))
    assert [f.split(":")[0] for f in r.failures] == ["max_giou_drop", "max_text_mismatch"]
    assert r.exit_code == 1


def test_no_gt_makes_the_giou_gate_not_applicable_and_time_budget_flags(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(img)
    samples = [Sample("x", img, "<image>p")]
    model = _Fixed({"<image>p": ("ok [SEG]", [_m(["#...", "....", "....", "...."])])}, delay=0.05)
    res = verify(InMemoryModel(model), InMemoryModel(model), samples, time_budget=0.01, progress=False)
    assert res.summary["gt"] is None
    g = next(g for g in res.gates if g["name"] == "max_giou_drop")
    assert g["applicable"] is False and g["passed"] is True
    assert set(res.samples[0]["flags"]) == {"ref_over_budget", "cand_over_budget"}
    assert res.exit_code == 0  # over budget is flagged, not a gate
    assert model.calls[0]["generation_kwargs"] == {"max_time": 0.01}


# ------------------------------------------------------------------------------------------------ sample sets


def test_edit_distance_and_distribution():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "[SEG]") == 5 and edit_distance("same", "same") == 0
    assert edit_distance("Sure, [SEG].", "Sure, [SEG]") == 1
    assert distribution([]) is None
    assert distribution([1.0]) == {"n": 1, "mean": 1.0, "min": 1.0, "p5": 1.0, "p50": 1.0, "p95": 1.0, "max": 1.0}


def _column_runs(mask):
    """Reference uncompressed COCO RLE, written here: runs down the columns, starting with background."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    runs, cur, n = [], False, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    return runs


def test_coco_rle_and_polygons():
    # uncompressed RLE, column-major: a 3x2 image, counts bg 1, fg 2, bg 3 -> column 0: 0,1,1; column 1: 0,0,0
    m = rle.decode({"size": [3, 2], "counts": [1, 2, 3]})
    assert m.tolist() == [[False, False], [True, False], [True, False]]
    # compressed: small counts are one character each (value + 48); the 4th on is a difference to i-2
    assert rle.encode(m) == {"size": [3, 2], "counts": "123"}
    assert rle.decode({"size": [13, 1], "counts": "1235"}).tolist() == \
        rle.decode({"size": [13, 1], "counts": [1, 2, 3, 7]}).tolist()   # 7 = 2 + 5
    rng = np.random.RandomState(0)
    for _ in range(20):
        mask = rng.rand(13, 17) > rng.rand()
        enc = rle.encode(mask)
        assert np.array_equal(segmentation_to_mask(enc, 13, 17), mask)
        assert np.array_equal(rle.decode({"size": [13, 17], "counts": _column_runs(mask)}), mask)
    big = np.zeros((400, 500), bool)
    big[100:300, 20:480] = True
    assert np.array_equal(rle.decode(rle.encode(big)), big)
    # polygons, rasterised as the COCO API does: pixel (x, y) covers [x, x+1) x [y, y+1), so the square with
    # corners (1, 1) and (3, 3) covers the 2 x 2 pixels 1..2 in x and y
    sq = polygons_to_mask([[1, 1, 3, 1, 3, 3, 1, 3]], 5, 5)
    assert sq[1:3, 1:3].all() and sq.sum() == 4
    for bad in ({"size": [2, 2], "counts": [1, 1]}, {"size": [3, 2], "counts": "12"},
                {"size": [3, 2], "counts": "1234"}, {"size": [3, 2], "counts": "1 3"}, {"size": [-1, 2], "counts": ""}):
        with pytest.raises(ValueError):
            rle.decode(bad)


def _refcoco(tmp_path, refs_as="pickle"):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "images" / "COCO_1.jpg")
    enc = rle.encode(_m(["#####", "#####", ".....", ".....", ".....", "....."]))
    instances = {"images": [{"id": 1, "file_name": "COCO_1.jpg", "height": 6, "width": 5}],
                 "annotations": [{"id": 10, "image_id": 1, "segmentation": [[0, 3, 2, 3, 2, 5, 0, 5]]},
                                 {"id": 11, "image_id": 1, "segmentation": enc}],
                 "categories": []}
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val",
             "sentences": [{"sent": "left thing"}, {"sent": "the block "}]},
            {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [{"sent": "top band"}]},
            {"ref_id": 2, "ann_id": [10, 11], "image_id": 1, "split": "train", "sentences": [{"sent": "both"}]}]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    if refs_as == "pickle":
        refs_path = tmp_path / "refs(unc).p"
        refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    else:
        refs_path = tmp_path / "refs.json"
        refs_path.write_text(json.dumps(refs))
    return refs_path


@pytest.mark.parametrize("refs_as", ["pickle", "json"])
def test_refcoco_loader(tmp_path, refs_as):
    refs = _refcoco(tmp_path, refs_as)
    samples = load_refcoco(refs, tmp_path / "instances.json", tmp_path / "images", split="val")
    assert [s.id for s in samples] == ["0:0", "0:1", "1:0"]
    assert samples[1].prompt == "<image>Please segment the block."
    poly = samples[0].gt_mask()
    # the polygon (0,3)-(2,5), rasterised as the COCO API does (pixels 0..1 in x, 3..4 in y)
    assert poly.shape == (6, 5) and poly[3:5, 0:2].all() and poly.sum() == 4
    assert samples[2].gt_mask().sum() == 10 and samples[2].gt_mask()[:2].all()
    union = load_refcoco(refs, tmp_path / "instances.json", tmp_path / "images", split="train")
    assert len(union) == 1 and union[0].gt_mask().sum() == 14
    assert len(load_refcoco(refs, tmp_path / "instances.json", tmp_path / "images", split=None, limit=2)) == 2


def test_refcoco_pickle_with_code_is_refused(tmp_path):
    from maskport.errors import UnreadableFile

    refs = _refcoco(tmp_path)
    refs.write_bytes(pickle.dumps([{"x": Path("/etc")}]))  # names a class: refused, never imported
    with pytest.raises(UnreadableFile, match="only plain data"):
        load_refcoco(refs, tmp_path / "instances.json", tmp_path / "images")


def test_image_folder_samples(tmp_path):
    for name in ("b.png", "a.jpg"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    samples = load_image_folder(tmp_path, "Please segment the vessel.")
    assert [s.id for s in samples] == ["a.jpg", "b.png"]
    assert all(s.prompt == "<image>Please segment the vessel." and not s.has_gt for s in samples)


# ------------------------------------------------------------------------------------------------ could not run


def _assert_exit_2(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def test_could_not_run_is_exit_2_with_one_line(tmp_path, exports, samples_jsonl):
    a, _ = exports
    _assert_exit_2(_cli(tmp_path / "nope", a, "--samples", samples_jsonl), "REF export folder", "does not exist")
    _assert_exit_2(_cli(a, a), "no samples")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    _assert_exit_2(_cli(a, a, "--samples", bad), "not JSON")
    _assert_exit_2(_cli(a, a, "--samples", tmp_path), "--prompt")
    _assert_exit_2(_cli(a, a, "--samples", samples_jsonl, "--generation-kwargs", "{x"), "--generation-kwargs")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "nothing-like-this"}')
    _assert_exit_2(_cli(a, broken, "--samples", samples_jsonl, "--device", "cpu", "--no-progress",
                        "--max-new-tokens", 1, "--limit", 1), "could not load CAND")
    wrong = tmp_path / "wrong.jsonl"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "gt5.png")
    first = json.loads(samples_jsonl.read_text().splitlines()[0])
    wrong.write_text(json.dumps({**first, "image": str(samples_jsonl.parent / first["image"]),
                                 "gt_mask": "gt5.png"}) + "\n")
    _assert_exit_2(_cli(a, a, "--samples", wrong, "--device", "cpu", "--no-progress", "--max-new-tokens", 1),
                   "GT mask is 5 x 5")


def test_batched_verify_writes_the_same_report(ab_report, exports, samples_jsonl, tmp_path):
    """``--batch-size 3``: samples go through ``predict_forward`` three at a time (one left-padded batch), and the
    report's verdict, answers, mask counts and metrics are those of ``--batch-size 1`` (masks within float ties)."""
    a, b = exports
    _, out1 = ab_report
    r = _cli(a, b, "--samples", samples_jsonl, "--report", tmp_path / "b3", "--device", "cpu", "--max-new-tokens", 3,
             "--generation-kwargs", FORCE_SEG_JSON, "--no-progress", "--batch-size", 3)
    one = json.loads((out1 / "report.json").read_text())
    three = json.loads((tmp_path / "b3" / "report.json").read_text())
    assert r.exit_code == one["exit_code"], r.output
    assert three["settings"]["batch_size"] == 3 and one["settings"]["batch_size"] == 1
    assert three["verdict"] == one["verdict"] and three["failures"] == one["failures"]
    assert len(three["samples"]) == len(one["samples"]) >= 3
    for s1, s3 in zip(one["samples"], three["samples"]):
        for role in ("ref", "cand"):
            assert s3[role]["answer"] == s1[role]["answer"] and s3[role]["n_masks"] == s1[role]["n_masks"]
        for p1, p3 in zip(s1["pairs"], s3["pairs"]):
            assert abs(p3["dice"] - p1["dice"]) <= 1e-3 and abs(p3["iou"] - p1["iou"]) <= 1e-3
    for key in ("dice", "iou"):
        assert abs(three["summary"][key]["mean"] - one["summary"][key]["mean"]) <= 1e-3
