"""File safety shared by every writer and reader in peft-ortho.

- Writes go to a temporary folder beside the destination and are moved into place only when complete, so an
  interrupted save leaves nothing half-written, and an existing destination is never modified in place.
- Reads accept safetensors only. Pickled checkpoints (``.bin``, ``.pt``, ``.ckpt``) are refused, never
  unpickled: loading a pickle runs arbitrary code from whoever made the file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open

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


def load_safetensors(path: str, adapter: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata of a safetensors file, with errors that name the adapter."""
    refuse_pickle(path, adapter)
    if not os.path.isfile(path):
        raise AdapterFileError(f"no such file: {path}", adapter=adapter)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(
            f"{os.path.basename(path)} is not a readable safetensors file ({e})", adapter=adapter
        ) from e
    return tensors, metadata


def check_finite(tensors: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Refuse NaN/Inf, naming the first offending tensor."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterFileError(f"{bad} non-finite value(s) (NaN/Inf) in tensor {key}", adapter=adapter, layer=key)
