"""Run many ``maskport`` command lines cheaply and under limits: import maskport (torch, transformers, the families)
once, then fork one child per command line.

Protocol: the parent writes one JSON line ``{"jobs": 2, "cases": [{"id", "argv", "cwd", "stdout", "stderr",
"timeout", "mem_bytes", "fsize", "env"}]}``; this process prints ``{"ready": ..., "rss_kib": ...}`` after its
imports, then one JSON line with a result per case: ``{"id", "rc" (exit code, or -signal), "seconds",
"maxrss_kib"}``.

Each child: stdout/stderr to files, ``RLIMIT_AS`` = its parent's address space + ``mem_bytes`` (a runaway allocation
fails instead of eating the machine; the test also checks the peak RSS), ``RLIMIT_FSIZE`` when ``fsize`` is given
(SIGXFSZ ignored, so a write past it fails with EFBIG as on a full disk), ``alarm(timeout)`` (SIGALRM kills it),
then ``maskport.cli_errors.entry()`` with ``argv`` exactly as the console script runs it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(case: dict, base_vm: int) -> None:
    code = 3
    try:
        for k, v in (case.get("env") or {}).items():
            os.environ[k] = v
        out = os.open(case["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        if case.get("fsize"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], case["fsize"]))
        lim = base_vm + int(case["mem_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(case["timeout"]))
        os.chdir(case["cwd"])
        sys.argv = ["maskport", *case["argv"]]
        from maskport.cli_errors import entry

        try:
            entry()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException:  # noqa: BLE001 - anything escaping entry() is a failure the test reports
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import maskport.cli  # noqa: F401  (every command and its light imports)
    import maskport.convert.api  # noqa: F401
    import maskport.verify.api  # noqa: F401
    import maskport.verify.samples  # noqa: F401
    from maskport.families import FAMILIES

    for fam in FAMILIES.values():  # the families' modules (their transformers classes are imported there)
        __import__(type(fam).__module__)
    import transformers  # noqa: F401
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: F401
    import safetensors.torch  # noqa: F401
    from PIL import Image, PngImagePlugin  # noqa: F401

    base_vm = _vm_size()
    print(json.dumps({"ready": True, "rss_kib": _rss_kib(), "vm_bytes": base_vm}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        jobs = max(1, int(req.get("jobs", 2)))
        pending = list(req["cases"])
        running: dict[int, tuple[dict, float]] = {}
        results = []
        while pending or running:
            while pending and len(running) < jobs:
                case = pending.pop(0)
                t0 = time.monotonic()
                pid = os.fork()
                if pid == 0:
                    _child(case, base_vm)
                running[pid] = (case, t0)
            pid, status, ru = os.wait4(-1, 0)
            if pid not in running:
                continue
            case, t0 = running.pop(pid)
            rc = os.waitstatus_to_exitcode(status)
            results.append({"id": case["id"], "rc": rc, "seconds": round(time.monotonic() - t0, 3),
                            "maxrss_kib": ru.ru_maxrss})
        print(json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
