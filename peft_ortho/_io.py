"""File safety shared by every writer and reader in peft-ortho.

- Writes go to a staging folder beside the destination and are moved into place only when complete, so an
  interrupted save leaves nothing half-written, and an existing destination is never modified in place. An output
  that is, contains or lies inside one of the writer's inputs is refused before anything is written; what is moved
  into place has been checked (every tensor finite).
- Reads accept safetensors only, through ``safetensors.safe_open`` (which enforces the format). Pickled checkpoints
  (``.bin``, ``.pt``, ``.ckpt``) are refused, never unpickled: loading a pickle runs arbitrary code from whoever made
  the file. JSON files must be UTF-8 objects; adapter configs are validated field by field (``_validate``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ._validate import validate_adapter_config
from .errors import AdapterFileError, OutputExistsError, UnsafeOutputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Staging entries are named ".<destination>.<kind>-<host>-<pid>-<random>"; "tmp" holds a new output being written,
# "old" a previous output moved aside for the moment of the swap (only where the OS cannot exchange two names).
_STAGING = re.compile(r"^\.(?P<base>.+)\.(?P<kind>tmp|old)-(?P<host>[^-]*)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64]


def _staging_path(out_dir: str, kind: str) -> str:
    name = f".{os.path.basename(out_dir)}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    return os.path.join(os.path.dirname(out_dir), name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep its files
    return True


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_staging(out_dir: str) -> None:
    """Remove staging entries of ``out_dir`` left by writers that were killed (their process no longer exists).

    Only entries made on this host by a dead process are touched. A previous output moved aside by a writer killed
    mid-swap is put back when ``out_dir`` is missing, and removed otherwise (the swap had completed).
    """
    parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    host = _host()
    for entry in entries:
        m = _STAGING.match(entry)
        if m is None or m["base"] != base or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        path = os.path.join(parent, entry)
        if m["kind"] == "old" and not os.path.lexists(out_dir):
            with contextlib.suppress(OSError):
                os.rename(path, out_dir)
                continue
        _remove(path)


def _is_inside(child: str, parent: str) -> bool:
    return child != parent and os.path.commonpath([child, parent]) == parent


def input_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The paths a writer must protect for these inputs: each path, and each file in it with symlinks resolved.

    A Hub snapshot folder holds symlinks into the cache's ``blobs/``: the blobs are inputs too.
    """
    out = []
    for p in paths:
        if p is None:
            continue
        p = os.fspath(p)
        out.append(p)
        if os.path.isdir(p):
            with contextlib.suppress(OSError):
                out += [os.path.join(p, f) for f in os.listdir(p)]
    return out


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, what: str = "output") -> None:
    """Refuse an output path that is, contains or lies inside one of ``inputs`` (after resolving symlinks).

    Writing it would replace an input (``--out adapters/a``), delete inputs with the folder they are in
    (``--out adapters --overwrite``), or add files to an input folder.
    """
    out = os.fspath(out)
    real_out = os.path.realpath(out)
    for p in input_paths(inputs):
        real = os.path.realpath(p)
        if real_out == real:
            relation = "is"
        elif _is_inside(real, real_out):
            relation = "contains"
        elif _is_inside(real_out, real):
            relation = "lies inside"
        else:
            continue
        raise UnsafeOutputError(
            f"the {what} {out!r} {relation} the input {os.fspath(p)!r}: writing it would replace or delete an input. "
            "Choose an output outside every input"
        )


def _exchange(a: str, b: str) -> bool:
    """Swap two names in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False  # kernel or file system without exchange: fall back to rename aside + rename in
    raise OSError(err, os.strerror(err), b)


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Put the complete folder ``tmp`` at ``out_dir``, replacing what is there; ``out_dir`` is never left missing.

    Swapped atomically where the OS can; otherwise the old output is renamed aside, the new one renamed in, and the
    old one renamed back if that fails.
    """
    if _exchange(tmp, out_dir):
        _remove(tmp)  # now holds the previous output
        return
    old = _staging_path(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_dir(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    verify: bool = True,
) -> Iterator[str]:
    """Yield an empty staging folder; on success it becomes ``out_dir`` in one rename, on error it is removed.

    Args:
        out_dir: the folder to write. Existing and not empty is an ``OutputExistsError`` unless ``overwrite``; even
            then the old folder stays intact until the new one is complete, and is replaced in one atomic exchange
            (Linux) or renamed aside and back on failure. The check is repeated by the final rename itself, so two
            writers racing for the same ``out_dir`` cannot both succeed without ``overwrite``.
        overwrite: replace an existing ``out_dir``.
        inputs: paths the writer reads: ``out_dir`` may not be, contain or lie inside any of them
            (``UnsafeOutputError``, raised before anything is written).
        verify: check every ``*.safetensors`` file written into the staging folder (finite values) before it is
            moved into place.

    Staging folders of writers that were killed are removed on the next write to the same ``out_dir``. Folders are
    created with the user's umask (as ``mkdir`` does).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    inputs = list(inputs)
    check_output(out_dir, inputs)
    if os.path.islink(out_dir):
        raise OutputExistsError(f"{out_dir} is a symbolic link; give the folder itself")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise OutputExistsError(f"{out_dir} is a file; give a folder to write into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; pass overwrite=True or choose another folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    clean_stale_staging(out_dir)
    tmp = _staging_path(out_dir, "tmp")
    os.mkdir(tmp)  # mode 0o777 & ~umask, like any folder the user makes
    try:
        yield tmp
        if verify:
            verify_written(tmp)
        check_output(out_dir, inputs)  # a symlink swapped in meanwhile must not redirect the write into an input
        try:
            os.rename(tmp, out_dir)  # POSIX: replaces only a missing or empty folder, atomically
        except OSError as e:
            if not (os.path.lexists(out_dir) and e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)):
                raise
            if not overwrite or not os.path.isdir(out_dir) or os.path.islink(out_dir):
                raise OutputExistsError(
                    f"{out_dir} was created by another writer while this one ran; it was left as it is"
                ) from e
            _replace_dir(tmp, out_dir)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike, overwrite: bool = False, *, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[str]:
    """Yield a staging file name beside ``path``; on success it becomes ``path`` in one step, on error it is removed.

    An existing ``path`` is an ``OutputExistsError`` unless ``overwrite`` (checked again atomically when the file
    is moved into place: without ``overwrite`` it is linked, which fails if another writer created ``path``
    meanwhile). ``inputs`` as for ``atomic_dir``.
    """
    path = os.path.abspath(os.fspath(path))
    check_output(path, inputs)
    if os.path.isdir(path):
        raise OutputExistsError(f"{path} is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists; pass overwrite (--overwrite) or choose another file name")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    clean_stale_staging(path)
    tmp = _staging_path(path, "tmp")
    base, ext = os.path.splitext(path)
    tmp += ext  # writers such as matplotlib pick the format from the suffix
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise OutputExistsError(f"{path} was created by another writer while this one ran") from e
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_pickle(path: str, adapter: str | None = None) -> None:
    if path.endswith(PICKLE_SUFFIXES):
        raise AdapterFileError(
            f"{os.path.basename(path)} is a pickled checkpoint; peft-ortho only reads safetensors files and never "
            "unpickles (a pickle can run arbitrary code). Convert it with a tool you trust, then retry.",
            adapter=adapter,
        )


def read_json_object(path: str, adapter: str | None = None) -> dict:
    """A JSON file that must hold one object (UTF-8); anything else is an ``AdapterFileError`` naming the file."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start})", adapter=adapter) from e
    except (OSError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterFileError(f"{name} is not valid JSON ({e})", adapter=adapter) from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{name} holds a JSON {type(data).__name__}, not an object", adapter=adapter)
    return data


def read_adapter_folder(folder: str, adapter: str | None = None) -> tuple[dict, str]:
    """``(adapter_config.json as a validated dict, path of adapter_model.safetensors)`` of a saved PEFT adapter.

    The config is checked by ``validate_adapter_config`` (types, ranks, finite scales, safe patterns). Pickled
    weights beside a missing safetensors file are refused by name, never read.
    """
    if not os.path.isdir(folder):
        raise AdapterFileError(f"no such adapter folder: {folder}", adapter=adapter)
    config_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise AdapterFileError("adapter_config.json is missing: not a peft adapter folder", adapter=adapter)
    config = validate_adapter_config(read_json_object(config_path, adapter), adapter=adapter)
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        for candidate in sorted(os.listdir(folder)):
            refuse_pickle(os.path.join(folder, candidate), adapter)
        raise AdapterFileError("adapter_model.safetensors is missing", adapter=adapter)
    return config, weights


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every value is finite: one small reduction per floating-point tensor.

    A sum that overflows to inf only makes a suspect: callers then run the exact element-wise test
    (``check_finite``) to name the tensor, which passes for finite values.
    """
    floats = [t for t in tensors.values() if t.is_floating_point() and t.numel()]
    if not floats:
        return True
    # Summed in float64 (fp8 has no isfinite): an fp16 tensor of large finite values does not overflow the sum.
    sums = torch.stack([t.sum(dtype=torch.float64) for t in floats])
    return bool(torch.isfinite(sums).all())


def check_finite(tensors: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Refuse NaN/Inf, naming the first offending tensor."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            continue
        finite = torch.isfinite(t if t.element_size() > 1 else t.float())  # fp8 has no isfinite of its own
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise AdapterFileError(f"{bad} non-finite value(s) (NaN/Inf) in tensor {key}", adapter=adapter, layer=key)


def verify_written(folder: str) -> None:
    """Every ``*.safetensors`` file under ``folder`` is readable and holds only finite values."""
    for dirpath, _, filenames in os.walk(folder):
        for fn in sorted(filenames):
            if fn.endswith(".safetensors"):
                path = os.path.join(dirpath, fn)
                tensors, _ = mmap_safetensors(path)
                if not all_finite(tensors):
                    check_finite(tensors, adapter=None)


def mmap_safetensors(path: str, adapter: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, read with ``safetensors.safe_open``.

    safetensors enforces the format (header a JSON object, offsets inside the file, contiguous and not overlapping,
    metadata of strings, known dtypes, fp8 included); any violation is an ``AdapterFileError`` naming the file. The
    tensors are lazy zero-copy views of a private memory map of the file: pages are read on first touch, so a merge
    that streams layer by layer keeps only what it is working on in memory, and nothing written to a tensor reaches
    the file.
    """
    refuse_pickle(path, adapter)
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise AdapterFileError(f"{name} is not a readable safetensors file ({e})", adapter=adapter) from e
    return tensors, metadata
