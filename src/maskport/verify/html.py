"""The report's web page: ``index.html`` + PNG overlays in ``images/``. Self-contained: no scripts, no fonts or
styles from the internet; it opens from the file system."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from .compare import FLAGS

REF_RGB = (37, 99, 235)      # blue
CAND_RGB = (234, 88, 12)     # orange
GT_RGB = (22, 163, 74)       # green
BOTH_RGB = (55, 65, 81)      # slate
THUMB = 320                  # longer side of every overlay, in pixels
MAX_PAIRS_SHOWN = 3


# ------------------------------------------------------------------------------------------------ images


def _thumb_size(h: int, w: int) -> tuple[int, int]:
    s = THUMB / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def _edge(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _blend(base: np.ndarray, mask: np.ndarray, rgb, alpha: float = 0.45, edge: bool = True) -> np.ndarray:
    out = base.copy()
    color = np.asarray(rgb, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * color
    if edge:
        out[_edge(mask)] = color
    return out


def _save(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, compress_level=6)


def render_overlays(images_dir: Path, index: int, image, ref_masks: list[np.ndarray], cand_masks: list[np.ndarray],
                    gt: np.ndarray | None) -> dict[str, Any]:
    """Write the overlays of one sample; returns their paths relative to the report folder."""
    from PIL import Image

    images_dir.mkdir(parents=True, exist_ok=True)
    h, w = image.height, image.width
    size = _thumb_size(h, w)
    resample = Image.NEAREST if size[0] > w else Image.BILINEAR
    base = np.asarray(image.convert("RGB").resize(size, resample), dtype=np.float32)
    gray = base.mean(axis=2, keepdims=True).repeat(3, axis=2)
    faded = 0.45 * gray + 0.55 * 255.0
    stem = f"s{index:05d}"
    rel = lambda name: f"{images_dir.name}/{name}"
    files: dict[str, Any] = {"image": rel(f"{stem}_image.png"), "pairs": [], "gt": None}
    _save(base, images_dir / f"{stem}_image.png")
    empty = np.zeros((h, w), dtype=bool)
    n_pairs = max(len(ref_masks), len(cand_masks), 1)
    for i in range(min(n_pairs, MAX_PAIRS_SHOWN)):
        a = _resize_mask(ref_masks[i] if i < len(ref_masks) else empty, size)
        b = _resize_mask(cand_masks[i] if i < len(cand_masks) else empty, size)
        names = {k: f"{stem}_{k}{i}.png" for k in ("ref", "cand", "diff")}
        _save(_blend(base, a, REF_RGB), images_dir / names["ref"])
        _save(_blend(base, b, CAND_RGB), images_dir / names["cand"])
        diff = faded.copy()
        diff = _blend(diff, a & b, BOTH_RGB, alpha=0.55, edge=False)
        diff = _blend(diff, a & ~b, REF_RGB, alpha=0.9, edge=False)
        diff = _blend(diff, b & ~a, CAND_RGB, alpha=0.9, edge=False)
        _save(diff, images_dir / names["diff"])
        files["pairs"].append({"i": i, **{k: rel(v) for k, v in names.items()}})
    if gt is not None:
        name = f"{stem}_gt.png"
        _save(_blend(base, _resize_mask(gt, size), GT_RGB), images_dir / name)
        files["gt"] = rel(name)
    return files


# ------------------------------------------------------------------------------------------------ page

CSS = """
:root { --ok:#15803d; --ok-bg:#dcfce7; --bad:#b91c1c; --bad-bg:#fee2e2; --muted:#6b7280; --line:#e5e7eb;
        --ref:rgb(37,99,235); --cand:rgb(234,88,12); --gt:rgb(22,163,74); }
* { box-sizing: border-box; }
body { margin:0; background:#f6f7f9; color:#111827; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
       "Helvetica Neue",Arial,sans-serif; }
main { max-width:1240px; margin:0 auto; padding:28px 28px 60px; }
h1 { font-size:15px; font-weight:600; color:var(--muted); margin:0 0 10px; letter-spacing:.02em; }
h2 { font-size:19px; margin:34px 0 12px; }
h3 { font-size:15px; margin:0; }
code, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
.verdict { border-radius:14px; padding:22px 26px; display:flex; gap:26px; align-items:center; }
.verdict.pass { background:var(--ok-bg); border:1px solid #86efac; }
.verdict.fail { background:var(--bad-bg); border:1px solid #fca5a5; }
.verdict .word { font-size:40px; font-weight:800; letter-spacing:.04em; min-width:120px; }
.verdict.pass .word { color:var(--ok); } .verdict.fail .word { color:var(--bad); }
.verdict p { margin:2px 0; } .verdict ul { margin:6px 0 0; padding-left:20px; }
.models { color:#374151; font-size:14px; margin-top:10px; }
.grid2 { display:grid; grid-template-columns: 1fr 1fr; gap:20px; align-items:start; }
.card { background:#fff; border:1px solid var(--line); border-radius:12px; padding:16px 18px; }
table { border-collapse:collapse; width:100%; font-size:14px; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
td.num { text-align:right; font-variant-numeric: tabular-nums; }
tr:last-child td { border-bottom:none; }
.pill { display:inline-block; border-radius:999px; padding:1px 9px; font-size:12px; font-weight:600; }
.pill.ok { background:var(--ok-bg); color:var(--ok); } .pill.bad { background:var(--bad-bg); color:var(--bad); }
.pill.na { background:#f3f4f6; color:var(--muted); }
.flag { display:inline-block; background:#fef3c7; color:#92400e; border-radius:6px; padding:0 7px; font-size:12px;
        margin:1px 4px 1px 0; }
.note { color:var(--muted); font-size:13px; margin:8px 0 0; }
.sample { background:#fff; border:1px solid var(--line); border-radius:12px; padding:14px 16px; margin:0 0 16px; }
.sample header { display:flex; flex-wrap:wrap; gap:8px 18px; align-items:baseline; margin-bottom:6px; }
.sample .metrics { color:#374151; font-size:14px; }
.prompt { color:#374151; margin:2px 0 8px; }
.answers { display:grid; grid-template-columns: 1fr 1fr; gap:8px; margin-bottom:10px; }
.answer { background:#f9fafb; border-radius:8px; padding:6px 10px; overflow-wrap:anywhere; }
.answer b { font-family:system-ui,sans-serif; font-size:12px; margin-right:6px; }
.answer.ref b { color:var(--ref); } .answer.cand b { color:var(--cand); }
.strip { display:grid; grid-template-columns: repeat(5, 1fr); gap:8px; }
figure { margin:0; } figure img { width:100%; height:auto; border-radius:6px; display:block;
        image-rendering:auto; background:#eee; }
figcaption { font-size:12px; color:var(--muted); margin-top:3px; }
figcaption b.ref { color:var(--ref); } figcaption b.cand { color:var(--cand); } figcaption b.gt { color:var(--gt); }
.placeholder { aspect-ratio: 4 / 3; border:1px dashed #d1d5db; border-radius:6px; display:flex;
        align-items:center; justify-content:center; color:#9ca3af; font-size:13px; }
.legend { color:#374151; font-size:13px; margin:-4px 0 12px; }
.legend span { display:inline-block; width:11px; height:11px; border-radius:3px; margin:0 5px 0 14px;
        vertical-align:-1px; }
.legend span:first-child { margin-left:0; }
.pairlabel { font-size:12px; color:var(--muted); margin:10px 0 4px; }
.bad-cell { color:var(--bad); font-weight:600; } .ok-cell { color:var(--ok); }
details { margin-top:10px; } summary { cursor:pointer; color:#374151; }
footer { color:var(--muted); font-size:13px; margin-top:40px; }
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _f(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _or(x, default: str):
    return default if x is None else x


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _pill(passed: bool | None, text: str | None = None) -> str:
    if passed is None:
        return f'<span class="pill na">{_e(text or "n/a")}</span>'
    return f'<span class="pill {"ok" if passed else "bad"}">{_e(text or ("pass" if passed else "FAIL"))}</span>'


def _flags(flags: list[str]) -> str:
    return "".join(f'<span class="flag" title="{_e(FLAGS.get(f, f))}">{_e(f)}</span>' for f in flags)


def _verdict(report) -> str:
    passed = report["passed"]
    s = report["summary"]
    ref, cand = report["models"]["ref"], report["models"]["cand"]
    if passed:
        body = "<p><b>No drift beyond the thresholds.</b> CAND can replace REF.</p>"
    else:
        items = "".join(f"<li>{_e(f)}</li>" for f in report["failures"])
        body = f"<p><b>Drift beyond the thresholds</b> (exit code 1):</p><ul>{items}</ul>"
    return f"""
<section class="verdict {'pass' if passed else 'fail'}">
  <div class="word">{'PASS' if passed else 'FAIL'}</div>
  <div>{body}
    <div class="models"><b style="color:var(--ref)">REF</b> {_e(ref.get('path') or ref.get('label'))}<br>
    <b style="color:var(--cand)">CAND</b> {_e(cand.get('path') or cand.get('label'))}<br>
    {s['n_samples']} samples · mean Dice {_f(s['dice']['mean'])} · answers differ on {_pct(s['text_mismatch_rate'])}
    </div>
  </div>
</section>"""


def _gates(report) -> str:
    rows = []
    for g in report["gates"]:
        status = _pill(g["passed"]) if g["applicable"] else _pill(None, "no GT")
        rows.append(f"<tr><td>{_e(g['metric'])}<br><code>{_e(g['option'])}</code></td>"
                    f"<td class='num'>{_f(g['value'])}</td><td class='num'>{_e(g['comparison'])} "
                    f"{g['threshold']:g}</td><td>{status}</td></tr>")
    return ("<div class='card'><h3>Gate</h3><table><tr><th>check</th><th>value</th><th>threshold</th><th></th></tr>"
            + "".join(rows) + "</table></div>")


def _summary(report) -> str:
    s = report["summary"]
    d, i = s["dice"], s["iou"]
    rows = [
        ("Dice REF vs CAND", *(_f(d[k]) for k in ("mean", "min", "p5", "p50", "p95"))),
        ("IoU REF vs CAND", *(_f(i[k]) for k in ("mean", "min", "p5", "p50", "p95"))),
    ]
    dist = "".join(f"<tr><td>{r[0]}</td>" + "".join(f"<td class='num'>{v}</td>" for v in r[1:]) + "</tr>"
                   for r in rows)
    dp = s["max_abs_dprob"]
    other = [
        ("max |Δ probability|", "–" if dp is None else f"{dp['max']:.4g} (mean of samples {dp['mean']:.4g})"),
        ("answers differ", f"{s['text_mismatches']} of {s['n_samples']} ({_pct(s['text_mismatch_rate'])})"),
        ("mean edit distance of answers", f"{s['mean_edit_distance']:.2f} characters"),
        ("[SEG] count agreement", _pct(s["seg_count_agreement_rate"])),
        ("samples without a mask", f"REF {s['no_mask']['ref']} · CAND {s['no_mask']['cand']}"),
        ("samples with several masks", f"{s['multi_seg']['samples_with_multiple_masks']} "
                                       f"({s['multi_seg']['mask_pairs']} mask pairs compared)"),
    ]
    other_rows = "".join(f"<tr><td>{_e(k)}</td><td class='num'>{_e(v)}</td></tr>" for k, v in other)
    return (f"<div class='card'><h3>REF vs CAND</h3><div class='grid2'><table><tr><th></th><th>mean</th>"
            f"<th>min</th><th>p5</th><th>p50</th><th>p95</th></tr>{dist}</table>"
            f"<table>{other_rows}</table></div></div>")


def _gt_table(report) -> str:
    gt = report["summary"]["gt"]
    if gt is None:
        return ("<div class='card'><h3>Against ground truth</h3><p class='note'>No sample has a GT mask: only "
                "REF vs CAND is compared.</p></div>")
    rows = "".join(f"<tr><td><b style='color:var(--{r})'>{r.upper()}</b></td><td class='num'>{_f(gt[r]['giou'])}"
                   f"</td><td class='num'>{_f(gt[r]['ciou'])}</td><td class='num'>{_f(gt[r]['mean_dice'])}</td></tr>"
                   for r in ("ref", "cand"))
    rows += (f"<tr><td>drop (REF − CAND)</td><td class='num'>{_f(gt['giou_drop'])}</td>"
             f"<td class='num'>{_f(gt['ciou_drop'])}</td><td></td></tr>")
    return (f"<div class='card'><h3>Against ground truth ({gt['n']} samples)</h3><table><tr><th></th><th>gIoU</th>"
            f"<th>cIoU</th><th>mean Dice</th></tr>{rows}</table><p class='note'>{_e(gt['policy'])}.</p></div>")


def _models(report) -> str:
    rows = []
    for role in ("ref", "cand"):
        m = report["models"][role]
        sha = m.get("config_sha256")
        rows.append(f"<tr><td><b style='color:var(--{role})'>{role.upper()}</b></td>"
                    f"<td class='mono'>{_e(m.get('path') or m.get('label'))}</td>"
                    f"<td class='mono' title='{_e(sha)}'>{_e(sha[:12] + '…' if sha else '–')}</td>"
                    f"<td>{_e(m.get('dtype'))}</td><td>{_e(m.get('device'))}</td></tr>")
    return ("<div class='card'><h3>Models</h3><table><tr><th></th><th>path</th><th>config.json sha256</th>"
            "<th>dtype</th><th>device</th></tr>" + "".join(rows) + "</table></div>")


def _figure(src: str | None, caption: str, alt: str) -> str:
    if src is None:
        return f"<figure><div class='placeholder'>{_e(caption)}</div><figcaption>&nbsp;</figcaption></figure>"
    return f"<figure><img src='{_e(src)}' alt='{_e(alt)}' loading='lazy'><figcaption>{caption}</figcaption></figure>"


def _sample_card(rec, files, min_dice: float) -> str:
    cls = "bad-cell" if rec["dice"] < min_dice else "ok-cell"
    gt = ""
    if rec["has_gt"]:
        gt = (f" · IoU vs GT: <b style='color:var(--ref)'>REF</b> {_f(rec['ref']['gt']['iou'], 3)}"
              f" <b style='color:var(--cand)'>CAND</b> {_f(rec['cand']['gt']['iou'], 3)}")
    dp = "" if rec["max_abs_dprob"] is None else f" · max |Δp| {rec['max_abs_dprob']:.3g}"
    head = (f"<header><h3>sample {rec['index']} <span class='note'>id</span> <span class='mono'>{_e(rec['id'])}"
            f"</span></h3>"
            f"<span class='metrics'>Dice <b class='{cls}'>{_f(rec['dice'], 3)}</b> · IoU {_f(rec['iou'], 3)}{dp}"
            f" · masks {rec['ref']['n_masks']} / {rec['cand']['n_masks']}{gt}</span>"
            f"<span>{_flags(rec['flags'])}</span></header>")
    same = "same answer" if rec["text_equal"] else f"answers differ (edit distance {rec['edit_distance']})"
    answers = (f"<div class='answers'><div class='answer ref mono'><b>REF</b>{_e(rec['ref']['answer'])}</div>"
               f"<div class='answer cand mono'><b>CAND</b>{_e(rec['cand']['answer'])}</div></div>")
    strips = []
    for pair in files["pairs"]:
        p = rec["pairs"][pair["i"]]
        label = ""
        if len(rec["pairs"]) > 1:
            label = (f"<div class='pairlabel'>mask {pair['i'] + 1} of {len(rec['pairs'])} · Dice "
                     f"{_f(p['dice'], 3)}</div>")
        ref_cap = "<b class='ref'>REF</b>" + ("" if p["ref_present"] else " — no mask")
        cand_cap = "<b class='cand'>CAND</b>" + ("" if p["cand_present"] else " — no mask")
        gt_fig = (_figure(files["gt"], "<b class='gt'>GT</b>", "ground truth") if pair["i"] == 0 and files["gt"]
                  else _figure(None, "no GT" if pair["i"] == 0 else "GT: first mask only", ""))
        first = _figure(files["image"], "image", "image") if pair["i"] == 0 else "<figure></figure>"
        strips.append(label + "<div class='strip'>"
                      + first
                      + _figure(pair["ref"], ref_cap, "REF mask")
                      + _figure(pair["cand"], cand_cap, "CAND mask")
                      + gt_fig
                      + _figure(pair["diff"], "difference", "difference")
                      + "</div>")
    hidden = len(rec["pairs"]) - len(files["pairs"])
    more = f"<p class='note'>{hidden} more mask pair(s) not drawn; see report.json.</p>" if hidden > 0 else ""
    return (f"<article class='sample' id='s{rec['index']}'>{head}<div class='prompt'>{_e(rec['prompt'])} "
            f"<span class='note'>— {same}</span></div>{answers}{''.join(strips)}{more}</article>")


def _all_samples_table(report) -> str:
    min_dice = report["thresholds"]["min_dice"]
    rows = []
    for r in report["samples"]:
        cls = "bad-cell" if r["dice"] < min_dice else ""
        gt = (f"{_f(r['ref']['gt']['iou'], 3)} / {_f(r['cand']['gt']['iou'], 3)}" if r["has_gt"] else "–")
        link = f"<a href='#s{r['index']}'>{r['index']}</a>" if r.get("_drawn") else str(r["index"])
        rows.append(f"<tr><td>{link}</td><td class='mono'>{_e(r['id'])}</td><td class='num {cls}'>"
                    f"{_f(r['dice'], 4)}</td><td class='num'>{_f(r['iou'], 4)}</td>"
                    f"<td class='num'>{_f(r['max_abs_dprob'], 4)}</td>"
                    f"<td>{'same' if r['text_equal'] else 'differs (' + str(r['edit_distance']) + ')'}</td>"
                    f"<td class='num'>{r['ref']['n_masks']} / {r['cand']['n_masks']}</td><td class='num'>{gt}</td>"
                    f"<td>{_flags(r['flags'])}</td></tr>")
    return ("<table><tr><th>sample</th><th>id</th><th>Dice</th><th>IoU</th><th>max |Δp|</th><th>answer</th>"
            "<th>masks R / C</th><th>IoU vs GT R / C</th><th>flags</th></tr>" + "".join(rows) + "</table>")


LEGEND = ("<p class='legend'><span style='background:var(--ref)'></span>REF mask"
          "<span style='background:var(--cand)'></span>CAND mask<span style='background:var(--gt)'></span>GT mask"
          "<span style='background:rgb(55,65,81)'></span>difference: both"
          "<span style='background:var(--ref)'></span>REF only<span style='background:var(--cand)'></span>CAND only"
          " · samples sorted by Dice REF vs CAND, lowest first</p>")


def write_html(report: dict[str, Any], path: Path) -> None:
    drawn = {o["index"]: o for o in report["overlays"]}
    by_index = {r["index"]: r for r in report["samples"]}
    for r in report["samples"]:
        r["_drawn"] = r["index"] in drawn
    min_dice = report["thresholds"]["min_dice"]
    worst = [o for o in report["overlays"] if o["group"] == "worst"]
    rest = [o for o in report["overlays"] if o["group"] == "sample"]
    worst_html = "".join(_sample_card(by_index[o["index"]], o["files"], min_dice) for o in worst)
    rest_html = "".join(_sample_card(by_index[o["index"]], o["files"], min_dice) for o in rest)
    n = report["summary"]["n_samples"]
    settings = report["settings"]
    run = report.get("run", {})
    secs = run.get("seconds", {})
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>maskport verify: {'PASS' if report['passed'] else 'FAIL'}</title><style>{CSS}</style></head>
<body><main>
<h1>maskport verify · REF vs CAND on {n} samples</h1>
{_verdict(report)}
<h2>Summary</h2>
<div class="grid2">{_gates(report)}{_gt_table(report)}</div>
<div style="margin-top:20px">{_summary(report)}</div>
<div style="margin-top:20px">{_models(report)}</div>
<p class="note">Several masks: {_e(report['summary']['multi_seg']['policy'])}. No mask: {_e(settings['no_mask_policy'])}.</p>
<h2>Worst samples ({len(worst)})</h2>
{LEGEND}
{worst_html or "<p class='note'>none</p>"}
<h2>A sample of the rest ({len(rest)} of {max(0, n - len(worst))})</h2>
{rest_html or "<p class='note'>none</p>"}
<h2>All samples, worst first</h2>
<div class="card">{_all_samples_table(report)}</div>
<footer>
<p>Settings: samples {_e(settings['samples'].get('source'))} · device {_e(settings['device'])} ·
dtype {_e(settings['dtype'])} · max_new_tokens {_e(_or(settings['max_new_tokens'], "export default"))} ·
mask_threshold {_e(_or(settings['mask_threshold'], "export default"))} ·
time budget {_e(_or(settings['time_budget_s'], "none"))}{" s" if settings['time_budget_s'] else ""} ·
greedy {_e(settings['greedy'])} · generation_kwargs <code>{_e(json.dumps(settings['generation_kwargs']))}</code></p>
<p>Run: {run.get('num_processes', 1)} process(es) · {_e(run.get('started'))} ·
total {_f(secs.get('total'), 1)} s · maskport {_e(run.get('versions', {}).get('maskport'))}.
Every number is in <a href="report.json">report.json</a>.</p>
</footer>
</main></body></html>
"""
    for r in report["samples"]:
        r.pop("_drawn", None)
    path.write_text(page, encoding="utf-8")
