"""Where a conversion's time goes: CPU seconds per thread, and what each thread spends them on.

(Named time_profile, not profile: a profile.py beside the benchmark scripts would shadow the standard library
module that torch imports.)

    python benchmarks/convert/time_profile.py --size 3b --root /tmp/maskport-bench --py-spy /path/to/py-spy
    python benchmarks/convert/time_profile.py --size 3b --root /tmp/maskport-bench --py-spy ... --compare-rev REV

Runs ``maskport convert mmengine-to-hf`` once on ``generate.py``'s inputs (warm cache, as ``run.py``) and records:

1. **CPU seconds per thread** (user and system), read from ``/proc/<pid>/task/*/stat`` every 0.1 s; threads are
   named by their Python names, which a ``py-spy dump`` every second maps to thread ids. CPU seconds depend far
   less on what else runs on the machine than wall time does, so this part compares engines on a busy machine;
2. **what each thread does**: a second run under ``py-spy record --threads --native`` (50 samples/s); every
   sample is put in one category by the first matching frame (the matmul kernel, the bf16<->fp32 casts, the
   NaN/inf check, ``write``, ``copy_file_range``, ``pread``, hashing, imports, the family's ``prepare``, ...).
   py-spy counts a thread that is ready to run but waiting for a core as busy, so on a loaded machine these are
   shares of each thread's wall time, not CPU seconds; read them as proportions.

py-spy is not a dependency of maskport: install it anywhere (``pip install py-spy``) and pass its path.
Writes ``results/profile-<size>.json``; ``run.py --render`` puts it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import run as runner  # noqa: E402

RATE = 50
# (category, a substring of the sampled stack); the first match wins, most specific first
CATEGORIES = [
    ("NaN/inf check: isfinite", "isfinite"),
    ("NaN/inf check: min/max", "aminmax"),
    ("LoRA merge: sgemm", "sgemm"),
    ("LoRA merge: bf16<->fp32 casts", "lora_merge_rows"),
    ("NaN/inf check: other", "all_finite"),
    ("write (user buffer -> page cache)", "_write_all"),
    ("copy_file_range (renamed tensors)", "_Copier.copy"),
    ("pread (inputs -> pool buffers)", "pread_into"),
    ("read-ahead hints", "_fadvise_willneed"),
    ("pool buffers (mmap/munmap)", "_Pool"),
    ("sha256 of the checkpoint", "sha256_file"),
    ("sha256 of the shards", "_hash_range"),
    ("waiting (queues, pool, condition variables)", "Condition.wait"),
    ("waiting (queues, pool, condition variables)", "Thread.join"),
    ("waiting (queues, pool, condition variables)", "Queue.get"),
    ("plan", "build_plan"),
    ("family prepare (imports transformers, tokenizer, meta model)", ".prepare ("),
    ("tokenizer/config/code files", "write_files"),
    ("imports (torch, maskport, families)", "_find_and_load"),
    ("open the checkpoint (allowlisted unpickling)", "open_training_checkpoint"),
]


def thread_cpu(cmd: list[str], env: dict, py_spy: str | None) -> tuple[float, int, dict]:
    """Run ``cmd``; CPU seconds per Python thread name (threads named through ``py-spy dump``)."""
    tck = os.sysconf("SC_CLK_TCK")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, tuple[float, float]] = {}
    names: dict[int, str] = {}
    t0 = time.time()
    last_dump = 0.0
    while p.poll() is None:
        try:
            tids = os.listdir(f"/proc/{p.pid}/task")
        except OSError:
            tids = []
        for tid in tids:
            try:
                s = open(f"/proc/{p.pid}/task/{tid}/stat").read()
            except OSError:
                continue
            f = s[s.rindex(")") + 2:].split()
            seen[int(tid)] = (int(f[11]) / tck, int(f[12]) / tck)
        if py_spy and time.time() - last_dump > 1.0:
            last_dump = time.time()
            out = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(p.pid)], capture_output=True,
                                 text=True).stdout
            for m in re.finditer(r'Thread (\d+) \([^)]*\): "([^"]+)"', out):
                names[int(m.group(1))] = m.group(2)
        time.sleep(0.1)
    wall = time.time() - t0
    err = p.stderr.read() if p.stderr else ""
    if p.returncode:
        raise SystemExit(f"conversion failed (rc {p.returncode}):\n{err[-3000:]}")
    agg: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for tid, (u, s) in seen.items():
        name = "MainThread" if tid == p.pid else names.get(tid, "other (short-lived, or torch's own)")
        name = re.sub(r"_\d+$", "", name)  # executor threads: maskport-merge_0, _1, ...
        a = agg[name]
        a[0] += u
        a[1] += s
        a[2] += 1
    return wall, p.returncode, {k: {"user_s": round(u, 2), "sys_s": round(s, 2), "threads": n}
                                for k, (u, s, n) in agg.items()}


def categories(raw: Path) -> dict:
    """py-spy's raw samples -> {thread name: {category: seconds}}."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        m = re.match(r'thread \(\d+\)(?:: "?([^";]+)"?)?', frames[0])
        name = re.sub(r"_\d+$", "", (m.group(1) if m and m.group(1) else "MainThread").strip().strip('"'))
        cat = next((c for c, pat in CATEGORIES if pat in stack), "other")
        out[name][cat] += int(n) / RATE
    return {k: {c: round(v, 2) for c, v in sorted(cnt.items(), key=lambda x: -x[1])} for k, cnt in out.items()}


def profile(size: str, root: Path, py_spy: str | None, src: Path, label: str) -> dict:
    d = root / size
    inp = runner.inputs_of(d)
    in_files = [inp["ckpt"], inp["sam2"], *inp["base_shards"]]
    out = root / f"profile-out-{size}"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(src))
    convert = [sys.executable, "-m", "maskport.cli", "convert", "mmengine-to-hf", str(inp["ckpt"]), "--base",
               str(inp["base"]), "--sam2", str(inp["sam2"]), "-o", str(out), "--no-progress"]
    res: dict = {"engine": label}
    shutil.rmtree(out, ignore_errors=True)
    runner.settle()
    runner.warm(in_files)
    res["loadavg_before"] = runner.loadavg()
    wall, _, per_thread = thread_cpu(convert, env, py_spy)
    res.update(wall_s=round(wall, 2), loadavg_after=runner.loadavg(), cpu=per_thread)
    print(f"[{size}] {label}: {wall:.1f} s wall, CPU per thread: {json.dumps(per_thread)}")
    shutil.rmtree(out, ignore_errors=True)
    if py_spy:
        runner.settle()
        runner.warm(in_files)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.txt"
            subprocess.run([py_spy, "record", "-r", str(RATE), "--threads", "--native", "-f", "raw", "-o", str(raw),
                            "--", *convert], env=env, check=True, capture_output=True)
            res["samples"] = categories(raw)
        shutil.rmtree(out, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["3b", "7b"], default="3b")
    ap.add_argument("--root", type=Path, default=Path("/tmp/maskport-bench"))
    ap.add_argument("--py-spy", help="path of a py-spy executable (thread names and the per-thread samples)")
    ap.add_argument("--compare-rev", help="also profile the engine of this git revision")
    args = ap.parse_args(argv)
    if not (args.root / args.size / "GENERATED.json").is_file():
        raise SystemExit(f"no inputs in {args.root / args.size}: run generate.py first")
    res = {"size": args.size, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": runner.machine(), "commit": runner.sh(f"git -C '{REPO}' rev-parse --short HEAD"),
           "runs": [profile(args.size, args.root, args.py_spy, REPO / "src", "this checkout")]}
    if args.compare_rev:
        src = runner.engine_src(args.root, args.compare_rev)
        rev = runner.sh(f"git -C '{REPO}' rev-parse --short '{args.compare_rev}'")
        res["runs"].append(profile(args.size, args.root, args.py_spy, src, f"engine at {rev}"))
        shutil.rmtree(src.parent, ignore_errors=True)
    runner.RESULTS_DIR.mkdir(exist_ok=True)
    (runner.RESULTS_DIR / f"profile-{args.size}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {runner.RESULTS_DIR / f'profile-{args.size}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
