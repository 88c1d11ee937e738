"""maskport's file I/O in one place: pure helpers shared by ``convert`` and ``quantize``.

- :mod:`.sizes`: :func:`parse_size`, the one parser of ``--max-shard-size`` values (``2GB`` = 2·10⁹ bytes,
  ``2GiB`` = 2·2³⁰ bytes, as on the Hugging Face Hub);
- :mod:`.safetensors`: the safetensors dtype table, the header reader and the header builder;
- :mod:`.shards`: shard file names, greedy in-order packing into shards, ``model.safetensors.index.json``;
- :mod:`.torch_zip`: :func:`~.torch_zip.save_tensors`, torch's zip checkpoint format written one tensor at a time;
- :mod:`.atomic`: :func:`atomic_output_dir`, a hidden temporary folder renamed into place on success, and
  :func:`atomic_output_file`, the same for one file.

:mod:`.safetensors` imports torch; it is loaded on first use of one of its names here, so that importing
``maskport.io`` for a size or a folder does not.
"""

from __future__ import annotations

from .atomic import atomic_output_dir, atomic_output_file, check_output_apart, old_dir, partial_dir
from .shards import INDEX_NAME, SINGLE_NAME, index_json, pack_shards, shard_filenames, write_index
from .sizes import MAX_SIZE, UNITS, parse_size

_SAFETENSORS_NAMES = ("HEADER_MAX", "ST_DTYPES", "ST_DTYPE_NAMES", "StEntry", "TensorInfo", "build_header",
                      "dtype_size", "read_safetensors_header")


def __getattr__(name: str):
    if name in _SAFETENSORS_NAMES:
        from . import safetensors

        return getattr(safetensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["INDEX_NAME", "MAX_SIZE", "SINGLE_NAME", "UNITS", "atomic_output_dir", "atomic_output_file", "check_output_apart", "index_json", "old_dir",
           "pack_shards", "parse_size", "partial_dir", "shard_filenames", "write_index", *_SAFETENSORS_NAMES]
