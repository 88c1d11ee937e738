"""``maskport serve EXPORT_DIR``: load the export (one replica per visible GPU, else CPU) and serve it."""

from __future__ import annotations

import ipaddress
import logging
import os

import click

from ..cli_errors import one_line_errors
from ..errors import MissingInput


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_replicas(export_dir, device: str = "auto"):
    from .engine import Replica, visible_devices

    return [Replica.load(export_dir, d) for d in visible_devices(device)]


@click.command("serve")
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the model: use --api-key then.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="MASKPORT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every /v1 call (or set MASKPORT_API_KEY).")
@click.option("--device", default="auto", show_default=True,
              help="auto: one replica per visible GPU, else CPU; cpu; cuda (every GPU); cuda:N.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Most requests run as one batch (1: no batching).")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="How long a worker waits for more requests to fill a batch.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100_000),
              help="Requests queued or running at once; more get 503.")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, type=click.FloatRange(0.1, 86_400),
              help="Seconds a request may wait for its result (then 504; a queued one leaves the queue).")
@click.option("--max-body-mb", default=20.0, show_default=True, type=click.FloatRange(0.001, 4096))
@click.option("--max-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1))
@click.option("--max-prompt-chars", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=512, show_default=True, type=click.IntRange(1),
              help="The most max_new_tokens a request may ask for.")
@click.option("--default-new-tokens", default=64, show_default=True, type=click.IntRange(1),
              help="max_new_tokens when a request does not say.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--trust-export-code", is_flag=True,
              help="Load the folder even if its Python files are not the export code this maskport writes (they run on load).")
@one_line_errors
def serve_command(export_dir, host, port, api_key, device, max_batch, max_wait_ms, max_queue, timeout_s,
                  max_body_mb, max_pixels, max_prompt_chars, max_new_tokens, default_new_tokens, log_level,
                  trust_export_code):
    """Serve EXPORT_DIR over HTTP: POST /v1/segment, GET /v1/model, GET /healthz and a web page at /."""
    try:
        import uvicorn

        from .app import Limits, create_app
        from .engine import model_info
    except ImportError as exc:
        raise MissingInput(f"maskport serve needs its extra: pip install 'maskport[serve]' ({exc})") from None
    if not os.path.isfile(os.path.join(export_dir, "config.json")):
        raise MissingInput(f"{export_dir} is not an export folder (no config.json)")
    if not trust_export_code:
        from ..families.export_code import check_export_code

        check_export_code(export_dir)
    if default_new_tokens > max_new_tokens:
        raise click.BadParameter("--default-new-tokens is above --max-new-tokens")
    if api_key is not None and not api_key.strip():
        raise click.BadParameter("--api-key is empty")
    if not _loopback(host) and api_key is None:
        click.echo(f"warning: binding {host} without --api-key: anyone who reaches it can use the model", err=True)
    replicas = load_replicas(export_dir, device)
    info = model_info(export_dir, replicas)
    limits = Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_pixels=max_pixels,
                    max_prompt_chars=max_prompt_chars, max_new_tokens=max_new_tokens,
                    default_max_new_tokens=default_new_tokens, timeout_s=timeout_s)
    app = create_app(replicas, info, limits=limits, api_key=api_key, max_batch=max_batch,
                     max_wait_s=max_wait_ms / 1e3, max_queue=max_queue)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    click.echo(f"serving {info['family']} ({info['dtype']}) on {', '.join(info['replicas'])} at "
               f"http://{host}:{port}/ (auth {'on' if api_key else 'off'}, batch <= {max_batch})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
