"""Run one command under ``/usr/bin/time -v`` and record wall time and memory of the whole process tree.

Recorded: wall seconds, the maximum RSS ``/usr/bin/time`` reports (the largest of the processes it waited for), and,
sampled every 0.1 s from ``/proc/<pid>/status`` of the measured process, its peak VmRSS split into RssAnon (memory
the process allocated) and RssFile (pages of mapped files it touched: page cache that the process keeps mapped).

A memory guard protects the (shared) machine: when MemAvailable falls under ``guard_gib`` the command's process
group is killed and the run is recorded as out of memory. The measured process also gets ``oom_score_adj=1000``,
so the kernel's OOM killer, if it gets there first, picks it and nothing else.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TIME = "/usr/bin/time"


@dataclass
class Measurement:
    name: str
    cmd: list[str]
    rc: int | None = None
    wall_s: float | None = None
    max_rss_kib: int | None = None          # /usr/bin/time -v "Maximum resident set size"
    peak_rss_kib: int = 0                   # sampled VmRSS peak of the measured process
    peak_anon_kib: int = 0                  # sampled RssAnon peak
    peak_file_kib: int = 0                  # sampled RssFile peak
    oom: bool = False
    oom_detail: str = ""
    user_s: float | None = None
    sys_s: float | None = None
    extra: dict = field(default_factory=dict)
    stderr_tail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def run(name: str, cmd: list[str], *, env: dict | None = None, cwd: str | None = None, guard_gib: float = 1.5,
        log: Path | None = None) -> Measurement:
    m = Measurement(name, list(cmd))
    full = [TIME, "-v", *cmd]
    t0 = time.perf_counter()

    def preexec():
        os.setsid()
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # inherited by the measured command
        except OSError:
            pass

    proc = subprocess.Popen(full, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec, text=True)
    stop = threading.Event()
    min_avail = [mem_available_kib()]

    def sample():
        while not stop.is_set():
            for pid in _children(proc.pid) or []:
                st = _status(pid)
                m.peak_rss_kib = max(m.peak_rss_kib, st.get("VmRSS", 0))
                m.peak_anon_kib = max(m.peak_anon_kib, st.get("RssAnon", 0))
                m.peak_file_kib = max(m.peak_file_kib, st.get("RssFile", 0))
            avail = mem_available_kib()
            min_avail[0] = min(min_avail[0], avail)
            if avail < guard_gib * (1 << 20) and not m.oom:
                m.oom = True
                m.oom_detail = (f"MemAvailable fell below {guard_gib} GiB at {time.perf_counter() - t0:.0f} s with "
                                f"the process at {m.peak_rss_kib / (1 << 20):.1f} GiB RSS: killed by the runner's "
                                "memory guard")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    m.wall_s = round(time.perf_counter() - t0, 2)
    stop.set()
    th.join()
    m.rc = proc.returncode
    if log is not None:
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    m.stderr_tail = "\n".join(err.strip().splitlines()[-40:])
    g = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if g:
        m.max_rss_kib = int(g.group(1))
    g = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", err)
    if g:
        parts = [float(x) for x in g.group(1).split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        m.wall_s = round(secs, 2)
    for key, attr in (("User time (seconds)", "user_s"), ("System time (seconds)", "sys_s")):
        g = re.search(re.escape(key) + r": ([\d.]+)", err)
        if g:
            setattr(m, attr, float(g.group(1)))
    if "Command terminated by signal 9" in err and not m.oom:
        m.oom = True
        m.oom_detail = "killed by signal 9 (the kernel's OOM killer)"
    m.extra["min_mem_available_gib"] = round(min_avail[0] / (1 << 20), 2)
    return m
