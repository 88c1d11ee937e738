"""Benchmark: maskport vs the naive (official-style) converter vs a plain copy, at real Sa2VA shapes.

    python benchmarks/convert/generate.py --size 3b --size 7b --out /tmp/maskport-bench
    python benchmarks/convert/run.py --size 3b --size 7b --root /tmp/maskport-bench
    python benchmarks/convert/run.py --render          # RESULTS.md from benchmarks/convert/results/*.json

For each size (inputs from ``generate.py``):

1. ``maskport convert mmengine-to-hf`` under ``/usr/bin/time -v`` (wall time, max RSS of the whole process;
   RssAnon/RssFile sampled from ``/proc``);
2. the lower bound: a plain copy (``cp``, then ``head -c`` for the remainder) of exactly as many bytes of the
   input files as maskport wrote;
3. the LoRA matmuls alone (``lora_matmuls.py``: every merged linear's float32 ``addmm``, in memory);
4. the naive baseline (``baseline.py``), with a memory guard: if the machine runs out of memory, the run is
   recorded as out of memory.

Caches cannot be dropped here (no root over the VM's page cache), so every run is warm: its input files are read
once right before it (their page-cache residency is recorded), and ``sync`` runs between measurements. The
maskport and copy runs are repeated (``--repeat``, default 2) and the fastest of each is used for the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import measure  # noqa: E402

RESULTS_DIR = HERE / "results"
GIB = 1 << 30


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def machine() -> dict:
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
    import torch

    return {
        "cpu": sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor(),
        "cores": os.cpu_count(),
        "threads_per_core": sh("lscpu | sed -n 's/^Thread(s) per core: *//p'"),
        "ram_gib": round(mem / (1 << 20), 1),
        "swap": sh("free -b | awk '/Swap/ {print $2}'"),
        "disk": sh("df -h --output=source,size,avail / | tail -1"),
        "kernel": platform.release(),
        "virtualisation": sh("systemd-detect-virt 2>/dev/null") or sh("grep -o 'firecracker' /proc/cmdline") or "?",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": sh(f"{sys.executable} -c 'import transformers; print(transformers.__version__)'"),
        "peft": sh(f"{sys.executable} -c 'import peft; print(peft.__version__)'"),
        "thp": sh("cat /sys/kernel/mm/transparent_hugepage/enabled"),
        "dirty_ratio": sh("cat /proc/sys/vm/dirty_ratio"),
    }


def loadavg() -> str:
    return open("/proc/loadavg").read().split(" ")[0]


def settle(max_wait: float = 60.0) -> None:
    """``sync``, then wait until the dirty page cache is small, so one run's writeback does not bill the next."""
    os.sync()
    t0 = time.time()
    while time.time() - t0 < max_wait:
        dirty = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("Dirty:")))
        if dirty < 64 << 10:
            return
        time.sleep(0.5)
        os.sync()


def warm(files: list[Path]) -> float:
    """Read ``files`` once (into the page cache); returns the fraction of their bytes resident afterwards."""
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    total = sum(f.stat().st_size for f in files)
    res = 0
    for f in files:
        out = sh(f"fincore --bytes --noheadings --raw --output RES '{f}'")
        res += int(out) if out.isdigit() else 0
    return round(res / total, 3) if total else 1.0


def file_sha256(f: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    buf = bytearray(16 << 20)
    with open(f, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def largest_tensor(d: Path) -> tuple[str, int]:
    best = ("", 0)
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__" and v["data_offsets"][1] - v["data_offsets"][0] > best[1]:
                best = (k, v["data_offsets"][1] - v["data_offsets"][0])
    return best


def inputs_of(d: Path) -> dict:
    base = d / "base"
    return {"ckpt": d / "work_dirs" / "iter_40000.pth", "base": base, "sam2": d / "sam2_hiera_large.pt",
            "base_shards": sorted(base.glob("*.safetensors"))}


def copy_cmd(sources: list[Path], nbytes: int, dest: Path) -> list[str]:
    """A shell command copying exactly ``nbytes`` bytes of ``sources`` into ``dest``: whole files with ``cp``,
    the remainder with ``head -c``."""
    whole, left, part = [], nbytes, None
    for s in sources:
        size = s.stat().st_size
        if size <= left:
            whole.append(s)
            left -= size
        else:
            part = (s, left)
            break
    cmds = []
    if whole:
        cmds.append("cp " + " ".join(f"'{s}'" for s in whole) + f" '{dest}/'")
    if part and part[1]:
        cmds.append(f"head -c {part[1]} '{part[0]}' > '{dest}/{part[0].name}.part'")
    return ["sh", "-c", " && ".join(cmds)]


def engine_src(root: Path, rev: str) -> Path:
    """The ``src`` folder of the repository at ``rev`` (``git archive``), to measure an older engine."""
    dest = root / f"src-{rev}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    subprocess.run(f"git -C '{REPO}' archive '{rev}' src | tar -x -C '{dest}'", shell=True, check=True)
    return dest / "src"


def bench(size: str, root: Path, *, repeat: int, baseline: bool, log_dir: Path, compare_rev: str | None = None,
          sha256_run: bool = True, matmuls: bool = True) -> dict | None:
    d = root / size
    if not (d / "GENERATED.json").is_file():
        print(f"[{size}] not generated in {d}: run generate.py first (or it was skipped for disk space)")
        return None
    gen = json.loads((d / "GENERATED.json").read_text())
    inp = inputs_of(d)
    in_files = [inp["ckpt"], inp["sam2"], *inp["base_shards"]]
    in_bytes = sum(f.stat().st_size for f in in_files)
    out_est = sum(f.stat().st_size for f in inp["base_shards"])
    free = shutil.disk_usage(root).free
    if free < 1.1 * out_est:
        print(f"[{size}] SKIPPED: {free / 1e9:.1f} GB free, an export needs ~{out_est / 1e9:.1f} GB")
        return None
    out = root / f"out-{size}"
    res: dict = {"size": size, "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                 "inputs": {"bytes": in_bytes, "files": {k: v for k, v in gen["bytes"].items()}},
                 "maskport": [], "copy": [], "lora_matmuls": None, "baseline": None, "baseline_bf16": None}
    # the engine of this checkout (not whatever `maskport` is installed), and with --compare-rev an older one
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO / "src"))
    maskport = [sys.executable, "-m", "maskport.cli"]
    res["commit"] = sh(f"git -C '{REPO}' rev-parse --short HEAD")
    older = engine_src(root, compare_rev) if compare_rev else None
    if older is not None:
        res["older_engine"] = {"rev": sh(f"git -C '{REPO}' rev-parse --short '{compare_rev}'"), "runs": []}
    out_sha: dict[str, str] = {}

    def convert(name: str, run_env: dict, log: str) -> "measure.Measurement":
        shutil.rmtree(out, ignore_errors=True)
        settle()
        resident = warm(in_files)
        load = loadavg()
        m = measure.run(name, [*maskport, "convert", "mmengine-to-hf", str(inp["ckpt"]), "--base",
                               str(inp["base"]), "--sam2", str(inp["sam2"]), "-o", str(out), "--no-progress"],
                        env=run_env, log=log_dir / log)
        m.extra.update(inputs_resident=resident, loadavg_before=load, loadavg_after=loadavg())
        if m.rc == 0:
            m.extra["bytes_out"] = dir_bytes(out)
            m.extra["largest_target"] = largest_tensor(out)
            rep_json = json.loads((out / "conversion_report.json").read_text())
            m.extra["targets"] = rep_json["coverage"]["targets"]
            if older is not None:  # the two engines' shards must be byte-identical: compared by sha256
                m.extra["shards_sha256"] = {f.name: file_sha256(f) for f in sorted(out.glob("*.safetensors"))}
        print(f"[{size}] {name}: rc {m.rc}, {m.wall_s} s (user {m.user_s} sys {m.sys_s}), max RSS "
              f"{(m.max_rss_kib or 0) / (1 << 20):.2f} GiB (anon {m.peak_anon_kib / (1 << 20):.2f}, file "
              f"{m.peak_file_kib / (1 << 20):.2f}), load {load}" + ("" if m.rc == 0 else "\n" + m.stderr_tail[-2000:]))
        return m

    for rep in range(repeat):
        m = convert("maskport", env, f"{size}-maskport-{rep}.log")
        res["maskport"].append(m.as_dict())
        out_bytes = m.extra.get("bytes_out") or out_est
        shutil.rmtree(out, ignore_errors=True)
        if older is not None:
            o = convert(f"maskport at {compare_rev}", dict(env, PYTHONPATH=str(older)),
                        f"{size}-maskport-{compare_rev}-{rep}.log")
            res["older_engine"]["runs"].append(o.as_dict())
            shutil.rmtree(out, ignore_errors=True)
            if o.rc == 0 and m.rc == 0:
                same = o.extra["shards_sha256"] == m.extra["shards_sha256"]
                res["older_engine"]["identical_shards"] = same and res["older_engine"].get("identical_shards", True)
                print(f"[{size}] shards byte-identical to the engine at {compare_rev}: {same}")
        # the plain-copy bound, same number of bytes, same (warm) conditions
        dest = root / f"copy-{size}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        srcs = [*inp["base_shards"], inp["ckpt"], inp["sam2"]]
        settle()
        resident = warm(srcs)
        load = loadavg()
        c = measure.run("copy", copy_cmd(srcs, out_bytes, dest), log=log_dir / f"{size}-copy-{rep}.log")
        c.extra.update(bytes=dir_bytes(dest), inputs_resident=resident, loadavg_before=load, loadavg_after=loadavg())
        res["copy"].append(c.as_dict())
        print(f"[{size}] copy #{rep}: {c.wall_s} s for {c.extra['bytes'] / 1e9:.2f} GB, load {load}")
        shutil.rmtree(dest, ignore_errors=True)
    if older is not None:
        shutil.rmtree(older.parent, ignore_errors=True)
    # the same conversion with shard checksums on (--sha256, off by default), once, for the record
    shutil.rmtree(out, ignore_errors=True)
    if sha256_run:
        settle()
        warm(in_files)
        load = loadavg()
        m = measure.run("maskport --sha256", [*maskport, "convert", "mmengine-to-hf", str(inp["ckpt"]), "--base",
                                              str(inp["base"]), "--sam2", str(inp["sam2"]), "-o", str(out),
                                              "--no-progress", "--sha256"],
                        env=env, log=log_dir / f"{size}-maskport-sha256.log")
        m.extra.update(loadavg_before=load, bytes_out=dir_bytes(out) if m.rc == 0 else 0)
        res["maskport_sha256"] = m.as_dict()
        print(f"[{size}] maskport --sha256: rc {m.rc}, {m.wall_s} s, max RSS {m.max_rss_kib / (1 << 20):.2f} GiB")
        shutil.rmtree(out, ignore_errors=True)
    if matmuls:
        settle()
        p = subprocess.run([sys.executable, str(HERE / "lora_matmuls.py"), "--size", size, "--threads", "1"],
                           capture_output=True, text=True, env=env)
        res["lora_matmuls"] = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
                               else {"error": p.stderr[-2000:]})
        print(f"[{size}] LoRA matmuls: {res['lora_matmuls']}")
    if baseline:
        for dtype, key in (("float32", "baseline"), ("bfloat16", "baseline_bf16")):
            bout = root / f"baseline-out-{size}"
            shutil.rmtree(bout, ignore_errors=True)
            settle()
            resident = warm(in_files)
            load = loadavg()
            b = measure.run(key, [sys.executable, str(HERE / "baseline.py"), str(inp["ckpt"]), "--base",
                                  str(inp["base"]), "--sam2", str(inp["sam2"]), "-o", str(bout), "--dtype", dtype],
                            env=env, guard_gib=1.0, log=log_dir / f"{size}-{key}.log")
            b.extra.update(inputs_resident=resident, loadavg_before=load, loadavg_after=loadavg(), dtype=dtype)
            b.extra["progress"] = [line for line in (log_dir / f"{size}-{key}.log").read_text().splitlines()
                                   if line.startswith("[baseline")]
            if b.rc == 0 and bout.exists():
                b.extra["bytes_out"] = dir_bytes(bout)
            res[key] = b.as_dict()
            print(f"[{size}] {key}: rc {b.rc}, {b.wall_s} s, max RSS {(b.max_rss_kib or 0) / (1 << 20):.2f} GiB, "
                  f"oom {b.oom} {b.oom_detail}")
            shutil.rmtree(bout, ignore_errors=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    # paths inside the repository are recorded relative to it (no machine-specific prefix in the results)
    text = json.dumps(res, indent=1).replace(str(REPO) + "/", "")
    (RESULTS_DIR / f"{size}.json").write_text(text + "\n")
    return res


# --------------------------------------------------------------------------------------------------
# RESULTS.md
# --------------------------------------------------------------------------------------------------

def _gib(kib: int | None) -> str:
    return "-" if not kib else f"{kib / (1 << 20):.2f}"


def _cpu(x: dict) -> str:
    return "-" if x.get("user_s") is None else f"{x['user_s']} / {x['sys_s']}"


def _cpu_total(x: dict) -> str:
    return "?" if x.get("user_s") is None else f"{x['user_s'] + x['sys_s']:.1f}"


def render_profiles() -> list[str]:
    """The profile section, from ``results/profile-<size>.json`` (``time_profile.py``)."""
    lines: list[str] = []
    for path in sorted(RESULTS_DIR.glob("profile-*.json")):
        pr = json.loads(path.read_text())
        size = pr["size"].upper()
        lines += [f"## Where the time goes: {size} shape (time_profile.py)", "",
                  "Reproduce: `.venv/bin/python benchmarks/convert/time_profile.py --size "
                  f"{pr['size']} --root /tmp/maskport-bench --py-spy PATH [--compare-rev REV]` (py-spy installed "
                  "anywhere, e.g. `pip install py-spy` into a scratch venv). One conversion per engine for the CPU "
                  "seconds per thread (`/proc/<pid>/task/*/stat`), a second one under `py-spy record --threads "
                  f"--native` for what each thread does. Run {pr['date']}, commit {pr['commit']}.", ""]
        for run in pr["runs"]:
            cpu = run["cpu"]
            total = sum(v["user_s"] + v["sys_s"] for v in cpu.values())
            lines += [f"### {run['engine']}: {run['wall_s']} s wall, {total:.1f} CPU s (load average "
                      f"{run['loadavg_before']} before, {run['loadavg_after']} after)", "",
                      "| thread | user (s) | sys (s) | what it does (py-spy samples, s of the thread's wall time) |",
                      "|---|---|---|---|"]
            samples = run.get("samples", {})
            for name, v in sorted(cpu.items(), key=lambda kv: -(kv[1]["user_s"] + kv[1]["sys_s"])):
                cats = samples.get(name, {})
                top = ", ".join(f"{c} {sec}" for c, sec in list(cats.items())[:6])
                lines.append(f"| {name} (x{v['threads']}) | {v['user_s']} | {v['sys_s']} | {top or '-'} |")
            lines.append("")
        for para in pr.get("summary", []):  # written by hand after a run
            lines += [para, ""]
    return lines


def _best(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if r.get("rc") == 0]
    return min(ok, key=lambda r: r["wall_s"]) if ok else None


def render(results: list[dict], skipped: dict[str, str]) -> str:
    lines = ["# Conversion benchmark: maskport vs the naive converter vs a plain copy", ""]
    if results:
        m = results[0]["machine"]
        lines += [
            "Machine: " + f"{m['cpu']}, {m['cores']} cores ({m['threads_per_core']} thread/core), {m['ram_gib']} GiB RAM, "
            f"swap {'none' if m['swap'] in ('0', '') else m['swap']}, disk `{m['disk']}`, Linux {m['kernel']} "
            f"({m['virtualisation']} VM), THP `{m['thp']}`, vm.dirty_ratio {m['dirty_ratio']}; Python {m['python']}, "
            f"torch {m['torch']} (CPU), transformers {m['transformers']}, peft {m['peft']}.",
            "",
        ]
    lines += [
        "Reproduce (inputs go to /tmp/maskport-bench, ~10 GB for 3B and ~20 GB more for 7B):",
        "",
        "```bash",
        ".venv/bin/python benchmarks/convert/generate.py --size 3b --size 7b --out /tmp/maskport-bench",
        ".venv/bin/python benchmarks/convert/run.py --size 3b --size 7b --root /tmp/maskport-bench",
        "# as in the 2026-12-06 run (issue 18): the engine before measured in every repeat, shards compared, no",
        "# naive baseline, no extra --sha256 run",
        ".venv/bin/python benchmarks/convert/run.py --size 3b --size 7b --root /tmp/maskport-bench --no-baseline \\",
        "    --no-sha256-run --compare-rev f5c5f64",
        "```",
        "",
        "Each size needs room for its inputs plus one export (~10 + 9 GB at 3B, ~20 + 17 GB at 7B); the 7B inputs can "
        "be generated after the 3B run and its inputs deleted. On a shared machine, read the load averages in the "
        "tables and the user/sys CPU seconds before the wall times.",
        "",
        "Inputs are written by `generate.py` at the real shapes with random values: a Qwen2.5-VL-{3B,7B}-Instruct-"
        "shaped base folder (bf16 sharded safetensors, the hub's config and tokenizer size), Meta's "
        "`sam2.1_hiera_large` `.pt` (fp32, its real keys/shapes) and an mmengine `iter_40000.pth` (LoRA r=128/alpha 256 "
        "on all 7 linears of every LLM layer, `modules_to_save` embed_tokens/lm_head at 151670 rows, SAM2 mask "
        "decoder, `text_hidden_fcs`, bf16; message_hub with mmengine `HistoryBuffer`s).",
        "",
        "Every run is warm-cache (the page cache cannot be dropped here): its inputs are read right before it, "
        "`sync` runs between runs. Peak RSS is `/usr/bin/time -v`'s maximum resident set size of the whole process "
        "(anon = memory the process allocated; file = mapped file pages it touched, incl. shared libraries). "
        "The copy bound is `cp`/`head -c` of exactly as many input bytes as maskport wrote. The machine is "
        "shared (other jobs were running: see the load averages), so maskport and the copy are run twice, "
        "interleaved, and the faster of each is used for the ratios.",
        "",
        "Whether the naive fp32 baseline survives the 3B shape depends on what else holds memory: it peaks at ~21.7 GiB "
        "of the machine's 23.5 GiB. An earlier run (same inputs, an older engine, other jobs using memory) saw it "
        "killed at 19.7 GiB after 92 s; the run below saw it finish. At 7B it cannot fit (fp32 weights alone are "
        "~33 GB). The *bf16* run of the same naive code is a lower bound on what it needs (no fp32 up-cast).",
        "",
    ]
    for r in results:
        size = r["size"].upper()
        mk, cp, bl, lm = _best(r["maskport"]), _best(r["copy"]), r.get("baseline"), r.get("lora_matmuls") or {}
        lines += [f"## {size} shape", ""]
        lines += [f"Inputs: {r['inputs']['bytes'] / 1e9:.2f} GB (" + ", ".join(
            f"{k} {v / 1e9:.2f} GB" for k, v in r["inputs"]["files"].items()) + f"); run {r['date']}.", ""]
        if mk is None:
            lines += ["maskport failed: see the logs.", ""]
            continue
        for note in r.get("notes", []):  # written by hand into results/<size>.json after a run
            lines += [f"Note: {note}", ""]
        largest_name, largest = mk["extra"]["largest_target"]
        bound_kib = (1.5 * GIB + largest) / 1024
        lines += [
            "| run | wall (s) | user / sys (s) | peak RSS (GiB) | RssAnon / RssFile peak (GiB) | bytes in | bytes out | "
            "load avg before |",
            "|---|---|---|---|---|---|---|---|",
        ]
        older = r.get("older_engine") or {}
        runs = [(f"maskport #{i + 1}", x) for i, x in enumerate(r["maskport"])]
        runs += [(f"maskport at {older['rev']} (engine before) #{i + 1}", x) for i, x in enumerate(older.get("runs", []))]
        for label, x in runs:
            lines.append(f"| {label} | {x['wall_s']} | {_cpu(x)} | {_gib(x['max_rss_kib'])} | "
                         f"{_gib(x['peak_anon_kib'])} / {_gib(x['peak_file_kib'])} | {r['inputs']['bytes'] / 1e9:.2f} GB | "
                         f"{x['extra'].get('bytes_out', 0) / 1e9:.2f} GB | {x['extra']['loadavg_before']} |")
        if r.get("maskport_sha256"):
            x = r["maskport_sha256"]
            lines.append(f"| maskport --sha256 | {x['wall_s']} | {_cpu(x)} | {_gib(x['max_rss_kib'])} | {_gib(x['peak_anon_kib'])} / "
                         f"{_gib(x['peak_file_kib'])} | {r['inputs']['bytes'] / 1e9:.2f} GB | "
                         f"{x['extra'].get('bytes_out', 0) / 1e9:.2f} GB | {x['extra']['loadavg_before']} |")
        for i, x in enumerate(r["copy"]):
            lines.append(f"| plain copy #{i + 1} | {x['wall_s']} | {_cpu(x)} | {_gib(x['max_rss_kib'])} | - | "
                         f"{x['extra']['bytes'] / 1e9:.2f} GB | {x['extra']['bytes'] / 1e9:.2f} GB | "
                         f"{x['extra']['loadavg_before']} |")
        for key, label in (("baseline", "naive baseline (fp32, official)"),
                           ("baseline_bf16", "naive baseline in bf16 (lower bound)")):
            x = r.get(key)
            if not x:
                continue
            killed = x.get("oom")
            status = (f"**out of memory**" if killed else ("ok" if x.get("rc") == 0 else f"failed (rc {x.get('rc')})"))
            rss = x["max_rss_kib"] or x["peak_rss_kib"]
            lines.append(f"| {label}: {status} | {x['wall_s']}{' (killed)' if killed else ''} | {_cpu(x)} | "
                         f"{_gib(rss)}{'+ (killed)' if killed else ''} | {_gib(x['peak_anon_kib'])} / "
                         f"{_gib(x['peak_file_kib'])} | {r['inputs']['bytes'] / 1e9:.2f} GB | "
                         f"{x['extra'].get('bytes_out', 0) / 1e9:.2f} GB | {x['extra']['loadavg_before']} |")
        lines.append("")
        worst_rss = max(x["max_rss_kib"] for x in r["maskport"] if x.get("rc") == 0)  # every run must meet it
        mem_ok = worst_rss <= bound_kib
        lines += [
            f"- **memory target** (peak RSS <= 1.5 GiB + largest target tensor = 1.5 + {largest / GIB:.2f} "
            f"(`{largest_name}`, {largest / 1e6:.0f} MB) = {bound_kib / (1 << 20):.2f} GiB): "
            f"maskport {_gib(worst_rss)} GiB at worst over its runs -> **{'met' if mem_ok else 'NOT met'}** "
            f"({worst_rss * 1024 / r['inputs']['bytes']:.2f} x the input size).",
        ]
        b16 = r.get("baseline_bf16")
        if bl and bl.get("rc") == 0 and not bl.get("oom"):
            ratio = mk["wall_s"] / bl["wall_s"]
            lines.append(f"- **time target** (wall <= 0.5 x baseline): {mk['wall_s']} / {bl['wall_s']} s = "
                         f"**{ratio:.2f} x** -> **{'met' if ratio <= 0.5 else 'NOT met'}**; memory "
                         f"{mk['max_rss_kib'] / bl['max_rss_kib']:.3f} x the baseline's.")
        sh = r.get("maskport_sha256")
        if sh and sh.get("rc") == 0:
            ref = bl if bl and bl.get("rc") == 0 and not bl.get("oom") else b16
            if ref and ref.get("rc") == 0 and not ref.get("oom"):
                lines.append(f"- with `--sha256` (each shard's sha256 in the report; off by default since this run's "
                             f"engine): {sh['wall_s']} s = {sh['wall_s'] / ref['wall_s']:.2f} x the "
                             f"{'fp32' if ref is bl else 'bf16'} baseline (sha256 runs at ~1.5 GB/s on this CPU).")
        if bl and not (bl.get("rc") == 0 and not bl.get("oom")):  # the fp32 baseline did not finish
            last = (bl["extra"].get("progress") or ["(nothing logged)"])[-1]
            lines.append(f"- **the fp32 baseline cannot run on this machine**: out of memory after {bl['wall_s']} s at "
                         f"{_gib(bl['max_rss_kib'] or bl['peak_rss_kib'])} GiB RSS ({bl['oom_detail']}); its last "
                         f"progress line: `{last}`. maskport converts the same inputs in {mk['wall_s']} s with "
                         f"{_gib(mk['max_rss_kib'])} GiB.")
            if b16 and b16.get("rc") == 0 and not b16.get("oom"):
                ratio = mk["wall_s"] / b16["wall_s"]
                lines.append(f"- **time target** (wall <= 0.5 x baseline), against the bf16 run of the same baseline "
                             f"(strictly less work than the fp32 one, so its time is a lower bound): {mk['wall_s']} / "
                             f"{b16['wall_s']} s = **{ratio:.2f} x** -> **{'met' if ratio <= 0.5 else 'NOT met'}**; "
                             f"its peak RSS {_gib(b16['max_rss_kib'])} GiB = "
                             f"{b16['max_rss_kib'] / mk['max_rss_kib']:.1f} x maskport's.")
            elif b16:
                lines.append(f"- the bf16 run of the baseline did not finish either "
                             f"({'out of memory' if b16.get('oom') else 'rc ' + str(b16.get('rc'))} after "
                             f"{b16['wall_s']} s at {_gib(b16['max_rss_kib'] or b16['peak_rss_kib'])} GiB).")
            ratio_kill = mk["wall_s"] / bl["wall_s"]
            lines.append(f"- maskport's whole conversion took {ratio_kill:.2f} x the time after which the fp32 "
                         f"baseline was killed, unfinished.")
        elif not bl:
            lines.append("- time target: baseline not run.")
        if cp:
            lines.append(f"- **distance to the plain-copy bound**: {mk['wall_s']} / {cp['wall_s']} s = "
                         f"**{mk['wall_s'] / cp['wall_s']:.2f} x** the copy (aim: <= 2 x; best of each, same session).")
            ob = _best(older.get("runs", []))
            if ob:
                same = older.get("identical_shards")
                lines.append(f"- the engine before ({older['rev']}) in the same session: {ob['wall_s']} / "
                             f"{cp['wall_s']} s = **{ob['wall_s'] / cp['wall_s']:.2f} x** the copy; CPU (user + sys) "
                             f"{_cpu_total(ob)} s against {_cpu_total(mk)} s now; shards byte-identical (sha256) "
                             f"between the two engines: **{'yes' if same else 'NO' if same is not None else '?'}**.")
        if "addmm_s" in lm:
            lines.append(f"- LoRA matmuls alone ({lm['linears']} linears, r={lm['r']}, float32 addmm, {lm['threads']} "
                         f"thread(s), in memory): **{lm['addmm_s']} s** ({lm['gflop']} GFLOP at {lm['gflops_per_s']} "
                         f"GFLOP/s); with the bf16<->fp32 copies {lm['merge_with_casts_s']} s.")
        lines.append("")
    for size, why in skipped.items():
        lines += [f"## {size.upper()} shape", "", f"Skipped: {why}", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["3b", "7b"], action="append")
    ap.add_argument("--root", type=Path, default=Path("/tmp/maskport-bench"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--compare-rev", help="also measure the engine of this git revision in every repeat (interleaved; "
                                          "its shards are checked byte-identical by sha256)")
    ap.add_argument("--no-sha256-run", action="store_true", help="skip the extra run with --sha256")
    ap.add_argument("--no-matmuls", action="store_true", help="skip lora_matmuls.py")
    ap.add_argument("--render", action="store_true", help="only write RESULTS.md from results/*.json")
    args = ap.parse_args(argv)
    skipped: dict[str, str] = {}
    if not args.render:
        log_dir = args.root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for size in args.size or ["3b", "7b"]:
            if bench(size, args.root, repeat=args.repeat, baseline=not args.no_baseline, log_dir=log_dir,
                     compare_rev=args.compare_rev, sha256_run=not args.no_sha256_run,
                     matmuls=not args.no_matmuls) is None:
                skipped[size] = "inputs not generated (disk space) or no room for an export; see the run's output"
    results = [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("*.json"))
               if not p.name.startswith(("zero3-", "profile-")) and p.name != "skipped.json"]
    skip_file = RESULTS_DIR / "skipped.json"
    if skip_file.is_file():
        skipped = {**json.loads(skip_file.read_text()), **skipped}
    for r in results:
        skipped.pop(r["size"], None)
    import zero3  # the DeepSpeed ZeRO-3 section (zero3.py run)

    text = render(results, skipped) + "\n".join(["", *render_profiles(), *zero3.render_results(),
                                                  *zero3.SMALL_FOLDERS])
    (HERE / "RESULTS.md").write_text(text.rstrip("\n") + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
