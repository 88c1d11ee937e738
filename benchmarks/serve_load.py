"""Load test of ``maskport serve`` (benchmarks/serve.md): start the server as a subprocess on loopback, drive it
with N concurrent httpx clients for a fixed time, batching on (``--max-batch B``) and off (``--max-batch 1``),
in the same run on the same machine.

Per point: requests/s, latency p50/p95/p99, failures (any non-200 or transport error), answers that differ from
the one-by-one answer of the same sample (checked on every response), the mean batch size the server reports,
the server's RSS (start of the point / end / max, and its slope over the second half) and, on CUDA, the GPU
memory nvidia-smi reports.

    python benchmarks/serve_load.py --export /tmp/demo --clients 1,8,32 --duration 120 --json-out out.json

Every request loop is bounded by --duration and stops by itself; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "examples" / "tiny-sa2va" / "artifacts" / "heldout"


def samples(n: int) -> list[tuple[bytes, str]]:
    rows = [json.loads(x) for x in (HELDOUT / "samples.jsonl").read_text().splitlines() if x.strip()]
    return [((HELDOUT / r["image"]).read_bytes(), r["prompt"].replace("<image>", "")) for r in rows[:n]]


def gpu_memory_mib() -> list[int] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return [int(x) for x in out.stdout.split()] if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: str, max_batch: int, max_wait_ms: float, device: str, max_new: int, log: Path):
    import httpx

    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MASKPORT_API_KEY", None)
    port = free_port()
    with open(log, "a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "maskport.cli", "serve", export, "--port", str(port),
                                 "--device", device, "--max-batch", str(max_batch), "--max-wait-ms",
                                 str(max_wait_ms), "--max-queue", "1024", "--timeout", "600",
                                 "--default-new-tokens", str(max_new), "--log-level", "warning"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 900 and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start (see {log})")


async def run_point(url: str, n_clients: int, duration: float, data: list, reference: list, pid: int,
                    max_new: int) -> dict:
    import httpx
    import psutil

    proc = psutil.Process(pid)
    lat: list[float] = []
    batch_sizes: list[int] = []
    failures: list[str] = []
    mismatches = 0
    rss: list[tuple[float, float]] = []
    gpu: list[list[int]] = []
    t_start = time.perf_counter()
    deadline = t_start + duration

    async def client(k: int):
        nonlocal mismatches
        i = k
        async with httpx.AsyncClient(timeout=600) as c:
            while time.perf_counter() < deadline:
                img, prompt = data[i % len(data)]
                t = time.perf_counter()
                try:
                    r = await c.post(url + "/v1/segment", files={"image": ("i.png", img, "image/png")},
                                     data={"prompt": prompt, "max_new_tokens": str(max_new)})
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}: {r.text[:120]}")
                    else:
                        body = r.json()
                        lat.append(time.perf_counter() - t)
                        batch_sizes.append(body["timings"]["batch_size"])
                        ref = reference[i % len(data)]
                        if (body["prediction"], [m["counts"] for m in body["masks"]]) != ref:
                            mismatches += 1
                except Exception as exc:  # noqa: BLE001 - counted as a failure
                    failures.append(f"{type(exc).__name__}: {exc}"[:160])
                i += n_clients

    async def monitor():
        while time.perf_counter() < deadline:
            rss.append((time.perf_counter() - t_start, proc.memory_info().rss / 2**20))
            g = gpu_memory_mib()
            if g is not None:
                gpu.append(g)
            await asyncio.sleep(1.0)

    load_before = os.getloadavg()
    await asyncio.gather(monitor(), *(client(k) for k in range(n_clients)))
    wall = time.perf_counter() - t_start
    ms = np.asarray(lat) * 1e3
    half = [(t, m) for t, m in rss if t >= duration / 2]
    slope = float(np.polyfit([t for t, _ in half], [m for _, m in half], 1)[0] * 60) if len(half) >= 3 else None
    return {"clients": n_clients, "seconds": round(wall, 1), "requests": len(lat), "failures": len(failures),
            "failure_examples": failures[:3], "mismatches": mismatches,
            "throughput_rps": round(len(lat) / wall, 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
            "mean_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
            "rss_mib": {"start": round(rss[0][1], 1), "end": round(rss[-1][1], 1),
                        "max": round(max(m for _, m in rss), 1),
                        "slope_mib_per_min_second_half": None if slope is None else round(slope, 2)},
            "loadavg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
            "gpu_mib": {"start": gpu[0], "end": gpu[-1], "max": [max(x) for x in zip(*gpu)]} if gpu else None}


@click.command()
@click.option("--export", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--clients", default="1,8,32", show_default=True)
@click.option("--duration", default=120.0, show_default=True, help="Seconds per point.")
@click.option("--max-batch", default=8, show_default=True, help="The 'batching on' setting.")
@click.option("--max-wait-ms", default=10.0, show_default=True)
@click.option("--modes", default="on,off", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--samples", "n_samples", default=16, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
def main(export, clients, duration, max_batch, max_wait_ms, modes, device, max_new_tokens, n_samples, json_out):
    import httpx

    data = samples(n_samples)
    counts = [int(x) for x in clients.split(",")]
    result = {"command": " ".join(["python", "benchmarks/serve_load.py"] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
              "cpus": os.cpu_count(), "export": Path(export).name, "max_new_tokens": max_new_tokens,
              "max_wait_ms": max_wait_ms, "points": []}
    reference = None
    for mode in modes.split(","):
        mb = max_batch if mode == "on" else 1
        proc, url = start_server(export, mb, max_wait_ms, device, max_new_tokens,
                                 Path(json_out or 'serve_load').with_suffix('.server.log'))
        try:
            info = httpx.get(url + "/v1/model", timeout=30).json()
            result.setdefault("model", {k: info.get(k) for k in ("family", "dtype", "replicas", "quantization")})
            if reference is None:  # one by one, before any load: what every answer under load must equal
                reference = []
                for img, prompt in data:
                    b = httpx.post(url + "/v1/segment", files={"image": ("i.png", img, "image/png")},
                                   data={"prompt": prompt, "max_new_tokens": str(max_new_tokens)}, timeout=600).json()
                    reference.append((b["prediction"], [m["counts"] for m in b["masks"]]))
            for n in counts:
                point = asyncio.run(run_point(url, n, duration, data, reference, proc.pid, max_new_tokens))
                point["batching"] = mode
                point["max_batch"] = mb
                result["points"].append(point)
                print(json.dumps(point), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    for n in counts:
        on = next((p for p in result["points"] if p["clients"] == n and p["batching"] == "on"), None)
        off = next((p for p in result["points"] if p["clients"] == n and p["batching"] == "off"), None)
        if on and off and off["throughput_rps"]:
            result.setdefault("speedup_on_vs_off", {})[str(n)] = round(on["throughput_rps"] / off["throughput_rps"], 2)
    print(json.dumps(result.get("speedup_on_vs_off")), flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
