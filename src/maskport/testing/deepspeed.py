"""Genuine DeepSpeed checkpoints for the tests: ``deepspeed.initialize`` + ``engine.save_checkpoint`` on CPU.

:func:`save_with_deepspeed` starts ``world_size`` worker processes (gloo backend, ``DS_ACCELERATOR=cpu``). Each
builds the training module with a *builder* (``"package.module:function"``, called with ``builder_args``; it returns
``(module, client_state)`` with ``requires_grad`` set on the trained parameters), wraps it in a DeepSpeed engine of
the requested ZeRO stage and saves it the way mmengine's ``DeepSpeedStrategy`` does
(``save_checkpoint(dirname, tag=..., client_state=..., exclude_frozen_parameters=True)``).

``unfiltered_state_dict=True`` saves the module's full ``nn.Module.state_dict`` (bypassing a ``state_dict``
override that keeps only the trained tensors), so DeepSpeed's module state carries, besides the trained
parameters, every persistent buffer of the model (e.g. SAM2's ``positional_encoding_gaussian_matrix``), as the
module states of real Sa2VA DeepSpeed runs do.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_with_deepspeed", "load_pickled_module", "toy_module", "ToyModel"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_with_deepspeed(builder: str, builder_args: dict, out_root: Path, tag: str, *, stage: int,
                        world_size: int = 1, bf16: bool = True, unfiltered_state_dict: bool = False,
                        exclude_frozen_parameters: bool = True, timeout: float = 300) -> Path:
    """Run the workers; return the tag folder ``out_root/tag`` DeepSpeed wrote."""
    out_root = Path(out_root)
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    # the workers import maskport by name: put the folder holding this package first on their path
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    args = dict(builder=builder, builder_args=builder_args, out_root=str(out_root), tag=tag, stage=stage,
                bf16=bf16, unfiltered_state_dict=unfiltered_state_dict,
                exclude_frozen_parameters=exclude_frozen_parameters)
    procs = []
    for rank in range(world_size):
        penv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", f"import json,sys; from {__name__} import _worker; _worker(json.loads(sys.argv[1]))",
             json.dumps(args)], env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + timeout
    outputs, failed = [], False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            failed = True
        outputs.append(out)
        failed = failed or p.returncode != 0
    if failed:
        tails = "\n".join(f"--- rank {r} (rc={p.returncode}) ---\n{o[-5000:]}" for r, (p, o) in
                          enumerate(zip(procs, outputs)))
        raise RuntimeError(f"DeepSpeed workers failed:\n{tails}")
    folder = out_root / tag
    assert folder.is_dir(), f"DeepSpeed did not write {folder}"
    return folder


def load_pickled_module(args: dict) -> tuple[Any, dict]:
    """A builder for modules pickled whole by the fixture (``torch.save(module)``, a file the fixture itself just
    wrote; full pickle is fine for that): ``args = {"module": path, "client_state": {...}}``."""
    module = torch.load(args["module"], map_location="cpu", weights_only=False)
    return module, dict(args.get("client_state") or {})


class ToyModel(torch.nn.Module):
    """Parameters of several shapes (most element counts odd: not divisible by the world size), a frozen linear,
    a persistent float buffer, a persistent integer buffer and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.a = nn.Linear(7, 5)                      # 35 + 5
        self.b = nn.Linear(5, 3, bias=False)          # 15
        self.emb = nn.Embedding(11, 5)                # 55
        self.conv = nn.Conv2d(3, 2, 3)                # 54 + 2
        self.scale = nn.Parameter(torch.randn(1))     # 1
        self.frozen = nn.Linear(3, 3)                 # frozen: 9 + 3
        self.frozen.requires_grad_(False)
        self.register_buffer("gauss", torch.randn(3, 4))
        self.register_buffer("index", torch.arange(5))
        self.register_buffer("cache", torch.ones(2), persistent=False)


def toy_module(args: dict) -> tuple[ToyModel, dict]:
    """Builder of a seeded :class:`ToyModel` (``args = {"seed": int}``)."""
    torch.manual_seed(int(args.get("seed", 0)))
    return ToyModel(), {"meta": {"cfg": "toy = True\n"}}


def _worker(args: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    mod_name, fn_name = args["builder"].split(":")
    module, client_state = getattr(importlib.import_module(mod_name), fn_name)(args["builder_args"])
    if args["unfiltered_state_dict"]:
        # the full module state: DeepSpeed then keeps every persistent buffer beside the trained parameters
        module.state_dict = torch.nn.Module.state_dict.__get__(module)
    # skip the JIT build (~90 s with a cold cache) of DeepSpeed's shared-memory CPU all-reduce kernel: optional,
    # it only speeds up CPU collectives (gloo does them without it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    zero: dict[str, Any] = {"stage": args["stage"]}
    if args["stage"] in (1, 2):
        zero.update(overlap_comm=False, contiguous_gradients=False)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(args["bf16"])},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    engine.save_checkpoint(args["out_root"], tag=args["tag"], client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=args["exclude_frozen_parameters"])
    dist.barrier()
    dist.destroy_process_group()
    # leave without interpreter teardown: a native thread DeepSpeed/gloo started can still be alive at exit, and
    # its destructor then aborts the process ('terminate called without an active exception', rc -6) after the
    # checkpoint was written (seen once in ~10 suite runs). Everything is on disk and closed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
