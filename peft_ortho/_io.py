"""File safety shared by every writer and reader in peft-ortho.

- Writes go to a temporary folder beside the destination and are moved into place only when complete, so an
  interrupted save leaves nothing half-written, and an existing destination is never modified in place.
- Reads accept safetensors only. Pickled checkpoints (``.bin``, ``.pt``, ``.ckpt``) are refused, never
  unpickled: loading a pickle runs arbitrary code from whoever made the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch

from .errors import AdapterFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder; on success it replaces ``out_dir`` in one rename, on error it is removed.

    ``out_dir`` existing and not empty is an error unless ``overwrite=True``; even then the old folder stays intact
    until the new one is complete (it is renamed aside, the new one renamed in, then the old one deleted).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isfile(out_dir):
        raise FileExistsError(f"{out_dir} is a file; give a folder to write the adapter into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True or choose another folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_pickle(path: str, adapter: str | None = None) -> None:
    if path.endswith(PICKLE_SUFFIXES):
        raise AdapterFileError(
            f"{os.path.basename(path)} is a pickled checkpoint; peft-ortho only reads safetensors files and never "
            "unpickles (a pickle can run arbitrary code). Convert it with a tool you trust, then retry.",
            adapter=adapter,
        )


def read_adapter_folder(folder: str, adapter: str | None = None) -> tuple[dict, str]:
    """``(adapter_config.json as a dict, path of adapter_model.safetensors)`` of a saved PEFT adapter folder.

    Pickled weights beside a missing safetensors file are refused by name, never read.
    """
    if not os.path.isdir(folder):
        raise AdapterFileError(f"no such adapter folder: {folder}", adapter=adapter)
    config_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise AdapterFileError("adapter_config.json is missing: not a peft adapter folder", adapter=adapter)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"adapter_config.json is not valid JSON ({e})", adapter=adapter) from e
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        for candidate in sorted(os.listdir(folder)):
            refuse_pickle(os.path.join(folder, candidate), adapter)
        raise AdapterFileError("adapter_model.safetensors is missing", adapter=adapter)
    return config, weights


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every value is finite, in one reduction when the tensors tile one memory map of one float dtype.

    That is the layout of a LoRA safetensors file read by ``mmap_safetensors``: checking the file's data region at
    once replaces two small reductions per layer. A sum that overflows to inf only makes a suspect: callers then
    run the exact element-wise test (``check_finite``) to name the tensor, which passes for finite values.
    """
    values = list(tensors.values())
    if not values:
        return True
    first = values[0]
    same_map = all(
        t.dtype == first.dtype
        and t.is_contiguous()
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for t in values
    )
    if first.is_floating_point() and same_map:
        start = min(t.storage_offset() for t in values)
        end = max(t.storage_offset() + t.numel() for t in values)
        if end - start == sum(t.numel() for t in values):  # no gaps: the span holds only these tensors
            flat = torch.empty(0, dtype=first.dtype).set_(first.untyped_storage(), start, (end - start,))
            return bool(torch.isfinite(flat.sum()))
    return all(bool(torch.isfinite(t.sum())) for t in values if t.is_floating_point())


def check_finite(tensors: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Refuse NaN/Inf, naming the first offending tensor."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterFileError(f"{bad} non-finite value(s) (NaN/Inf) in tensor {key}", adapter=adapter, layer=key)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def mmap_safetensors(path: str, adapter: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Zero-copy views of every tensor in a safetensors file, backed by one private memory map.

    Follows the format's specification (8-byte little-endian header length, a JSON header of
    ``{name: {dtype, shape, data_offsets}}``, then the data) and validates every offset against the file size, so
    a truncated or corrupt file is an ``AdapterFileError`` rather than a crash. Pages are read on first touch: a
    merge that streams layer by layer keeps only what it is working on in memory.
    """
    import math
    import struct

    refuse_pickle(path, adapter)
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{name} is not a readable safetensors file ({e})", adapter=adapter) from e
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size) if size else None
    tensors = {}
    for key, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterFileError(f"{name}: bad header entry for {key!r} ({e})", adapter=adapter, layer=key) from e
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or data_start + end > size or begin < 0:
            raise AdapterFileError(
                f"{name}: tensor {key!r} lies outside the file (corrupt or truncated)", adapter=adapter
            )
        offset = data_start + begin
        if offset % itemsize:  # unaligned (never written by safetensors itself): copy instead of viewing
            raw = bytes(storage[offset : data_start + end])
            tensors[key] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
        else:
            tensors[key] = torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape)
    return tensors, metadata
