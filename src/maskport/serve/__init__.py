"""``maskport serve``: an HTTP API and a web page in front of an export folder (see docs/serve.md).

- :mod:`.engine`: model replicas (one per visible GPU, else one on CPU) and the dynamic batcher;
- :mod:`.app`: the FastAPI application (``/v1/segment``, ``/v1/model``, ``/healthz``, ``/``);
- :mod:`.page`: the web page;
- :mod:`.client`: a small Python client that decodes the masks (needs only httpx, numpy and pycocotools).

Importing this package imports neither FastAPI nor torch.
"""
