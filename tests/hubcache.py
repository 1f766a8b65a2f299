"""Lay out a real huggingface_hub cache on disk, so Hub loading paths can be tested offline.

``populate_hub_cache(cache_dir, "alice/rex", folder, revision="v1.2")`` makes ``cache_dir`` look exactly as if
``snapshot_download("alice/rex", revision="v1.2", cache_dir=cache_dir)`` had run against a Hub repo holding
``folder``'s files. Everything that reads the cache then works with ``HF_HUB_OFFLINE=1`` / ``local_files_only=True``
and no network: ``hf_hub_download``, ``snapshot_download``, ``scan_cache_dir``, ``get_cached_repo_tree``, and the
libraries built on them (``PeftModel.from_pretrained(base, "alice/rex", revision="v1.2", cache_dir=...)``,
diffusers' ``load_lora_weights(..., weight_name=...)``, peft-ortho's ``compose``).

The layout (huggingface_hub's ``file_download.py``, ``_snapshot_download.py`` and ``_tree_cache.py``)::

    <cache_dir>/<repo_type>s--<org>--<name>/          e.g. models--alice--rex
        blobs/<etag>                                  file contents, named by their Hub etag:
                                                      sha256 of the content for LFS files (*.safetensors, *.bin,
                                                      ... and anything over 10 MB), the git blob sha1
                                                      (sha1(b"blob <size>\\0" + content)) for the others
        snapshots/<commit>/<path in repo>             relative symlinks to ../../blobs/<etag> (copies where the file
                                                      system has no symlinks, as huggingface_hub does on Windows)
        refs/<revision>                               the commit hash, no newline (absent when the revision *is* a
                                                      commit hash)
        trees/<commit>.json                           the tree listing huggingface_hub ≥ 1.x caches, which marks the
                                                      snapshot complete

Calling it again for the same repo adds a revision (or overwrites one); blobs are shared between revisions.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping

COMMIT_HASH = re.compile(r"[0-9a-f]{40}")

# The Hub's default .gitattributes stores these in LFS (and refuses non-LFS files over 10 MB).
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.mlmodel", "*.model",
    "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth",
    "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content (what the Hub reports as etag / oid for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    name = path.rsplit("/", 1)[-1]
    return size > LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)


def _read_files(folder) -> dict[str, bytes]:
    """``{"sub/dir/file": bytes}`` from a folder (recursively, skipping hidden entries) or a mapping."""
    if isinstance(folder, Mapping):
        files = {
            str(k).replace(os.sep, "/"): (v.encode() if isinstance(v, str) else bytes(v)) for k, v in folder.items()
        }
    else:
        files = {}
        root = os.fspath(folder)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                full = os.path.join(dirpath, fn)
                with open(full, "rb") as f:
                    files[os.path.relpath(full, root).replace(os.sep, "/")] = f.read()
    for path in files:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid path in repo: {path!r}")
    if not files:
        raise ValueError("no files to put in the cache")
    return files


def populate_hub_cache(
    cache_dir: str | os.PathLike,
    repo_id: str,
    folder,
    revision: str = "main",
    commit_hash: str | None = None,
    *,
    repo_type: str = "model",
) -> str:
    """Cache ``folder``'s files as revision ``revision`` of Hub repo ``repo_id``; return the commit hash.

    ``folder``: a directory (its files, recursively; hidden entries such as ``.git`` skipped) or a mapping
    ``{"path/in/repo": bytes | str}``. ``revision``: a branch or tag (``"main"``, ``"v1.2"``, ``"refs/pr/1"``) or a
    40-hex commit hash. ``commit_hash``: the commit the revision points to; by default derived from the files and the
    revision (stable across runs). ``repo_type``: ``"model"``, ``"dataset"`` or ``"space"``.
    """
    files = _read_files(folder)
    if COMMIT_HASH.fullmatch(revision):
        if commit_hash is not None and commit_hash != revision:
            raise ValueError(f"revision {revision!r} is a commit hash but commit_hash={commit_hash!r}")
        commit_hash = revision
    if commit_hash is None:
        digest = hashlib.sha1(revision.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        commit_hash = digest.hexdigest()
    if not COMMIT_HASH.fullmatch(commit_hash):
        raise ValueError(f"commit_hash must be 40 lowercase hex digits, got {commit_hash!r}")
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must be 'name' or 'org/name', got {repo_id!r}")

    storage = os.path.join(os.fspath(cache_dir), "--".join([f"{repo_type}s", *repo_id.split("/")]))
    blobs = os.path.join(storage, "blobs")
    snapshot = os.path.join(storage, "snapshots", commit_hash)
    os.makedirs(blobs, exist_ok=True)
    tree = {}
    for path, data in sorted(files.items()):
        entry = {"size": len(data)}
        if is_lfs(path, len(data)):
            etag = hashlib.sha256(data).hexdigest()
            # The tree's blob_id of an LFS file is the git id of its pointer file.
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{etag}\nsize {len(data)}\n".encode()
            entry.update(blob_id=git_blob_sha1(pointer), lfs_sha256=etag, lfs_size=len(data))
        else:
            etag = git_blob_sha1(data)
            entry["blob_id"] = etag
        tree[path] = entry
        blob = os.path.join(blobs, etag)
        if not os.path.exists(blob):
            with open(blob + ".incomplete", "wb") as f:  # huggingface_hub's own temporary suffix
                f.write(data)
            os.replace(blob + ".incomplete", blob)
        link = os.path.join(snapshot, *path.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        try:
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
        except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
            shutil.copyfile(blob, link)
    if revision != commit_hash:
        ref = os.path.join(storage, "refs", *revision.split("/"))
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        with open(ref, "w") as f:
            f.write(commit_hash)  # no trailing newline: huggingface_hub reads the file verbatim
    os.makedirs(os.path.join(storage, "trees"), exist_ok=True)
    with open(os.path.join(storage, "trees", f"{commit_hash}.json"), "w") as f:
        json.dump({"format_version": 1, "files": tree}, f, indent=1)
    return commit_hash
