"""Helpers of the serve tests: a real uvicorn server in a thread on a free loopback port, the demo samples."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "examples" / "tiny-sa2va" / "artifacts" / "heldout"


def demo_samples(n: int) -> list[dict]:
    """The first n held-out samples, alternating the two tasks (different prompts and shapes)."""
    rows = [json.loads(line) for line in (HELDOUT / "samples.jsonl").read_text().splitlines() if line.strip()]
    by_task: dict[str, list] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for i in range(n):
        task = sorted(by_task)[i % len(by_task)]
        r = by_task[task][i // len(by_task)]
        out.append({"id": r["id"], "image": HELDOUT / r["image"], "prompt": r["prompt"].replace("<image>", "")})
    return out


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not server.started:
        if not thread.is_alive() or time.time() - t0 > 30:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
