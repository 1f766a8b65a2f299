"""Names → local files: a Hub repo id (optionally ``@revision``), a local adapter folder, or one ``.safetensors``.

Hub access goes through ``huggingface_hub`` (its cache, ``revision``, ``token``, ``HF_HUB_OFFLINE``) and downloads
only the files an adapter needs. The commit a Hub name resolved to is recorded, so a merged adapter's card can
say exactly what went into it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.file_download import REGEX_COMMIT_HASH
from huggingface_hub.utils import validate_repo_id
from tqdm.auto import tqdm

from .._io import PICKLE_SUFFIXES, refuse_pickle
from ..errors import AdapterFileError, IncompatibleAdaptersError
from ..statistics import is_statistics_file

ADAPTER_FILES = ["adapter_config.json", "*.safetensors"]  # weights, and adapter_statistics.safetensors when present


@dataclass(frozen=True)
class Source:
    """Where one adapter comes from. ``path`` is a local folder (``kind`` hub/folder) or a file (``kind`` file)."""

    name: str
    kind: str
    path: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        """Short name for messages and reports."""
        return self.name


def split_revision(name: str) -> tuple[str, str | None]:
    """Split a Hub name from its revision: ``"alice/rex@v1.2"`` → ``("alice/rex", "v1.2")``.

    Args:
        name: an adapter name, optionally ``@revision``; ``"alice/rex@"`` (an empty revision) is refused.

    Returns:
        ``(repo id or path, revision or None)``.
    """
    if "@" in name:
        repo, _, revision = name.partition("@")
        if not revision:
            raise AdapterFileError(
                "nothing follows '@': give a revision (branch, tag or commit) or drop the '@'", adapter=name
            )
        return repo, revision
    return name, None


# git's rules for ref names (``git check-ref-format``), plus the Hub's ``refs/pr/N``: what a branch or tag can be.
_BAD_REF = re.compile(r"(^|/)\.|\.\.|//|@\{|[\x00-\x20\x7f~^:?*\[\\]|\.lock(/|$)|[/.]$|^/|^@$")


def check_revision(revision: str, *, adapter: str | None = None) -> str:
    """Refuse a revision that is not a git ref name or commit (``..``, ``/x``, control characters, ``@{``...).

    The Hub cache looks a branch or tag up as the file ``refs/<revision>``: a revision such as ``../../x`` would read
    a file outside the repository's cache folder.

    Args:
        revision: a branch, tag or commit name.
        adapter: the adapter name the error names.

    Returns:
        ``revision``, unchanged.
    """
    if not isinstance(revision, str) or not revision or len(revision) > 255 or _BAD_REF.search(revision):
        raise AdapterFileError(
            f"revision {revision!r} is not a valid branch, tag or commit name (git ref-name rules)", adapter=adapter
        )
    return revision


def check_repo_id(repo_id: str, *, adapter: str | None = None) -> str:
    """Refuse what the Hub's own rules (``huggingface_hub.utils.validate_repo_id``) refuse, and a name without its
    ``owner/``: a bare name is a typo'd local path more often than a repo.

    Args:
        repo_id: ``owner/name``, without a revision.
        adapter: the adapter name the error names.

    Returns:
        ``repo_id``, unchanged.
    """
    if repo_id.count("/") != 1:
        raise AdapterFileError(
            "not a local folder, a .safetensors file, or a Hub repo id ('owner/name[@revision]')", adapter=adapter
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise AdapterFileError(f"not a valid Hub repo id ({e})", adapter=adapter) from e
    # Older huggingface_hub releases (1.32, the oldest admitted) match with `$`, which lets a trailing newline by, and
    # accept non-ASCII letters the Hub itself refuses.
    if not repo_id.isascii() or not repo_id.isprintable() or any(ch.isspace() for ch in repo_id):
        raise AdapterFileError(
            "not a valid Hub repo id (only ASCII letters, digits, '-', '_' and '.'; no white space)", adapter=adapter
        )
    return repo_id


def resolve(name: str, *, token: str | bool | None = None, cache_dir: str | None = None) -> Source:
    """Resolve one adapter name to local files (downloading through the Hub cache only when needed).

    Args:
        name: a local adapter folder, a diffusers LoRA folder, a ``.safetensors`` file, or a Hub repo id
            (``owner/name[@revision]``).
        token: the Hub token (as ``huggingface_hub`` takes it).
        cache_dir: the Hub cache (default: ``huggingface_hub``'s).

    Returns:
        The ``Source``: a folder or a file, and for a Hub name the commit it resolved to.
    """
    if os.path.isdir(name):
        folder = os.path.abspath(name)
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            return Source(name=name, kind="folder", path=folder)
        weights = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and not is_statistics_file(f))
        if len(weights) == 1:  # a diffusers LoRA folder (pytorch_lora_weights.safetensors)
            return Source(name=name, kind="file", path=os.path.join(folder, weights[0]))
        for f in os.listdir(folder):
            refuse_pickle(os.path.join(folder, f), adapter=name)
        raise AdapterFileError(
            f"folder {folder} has no adapter_config.json and {len(weights)} .safetensors files: not an adapter",
            adapter=name,
        )
    if os.path.isfile(name):
        refuse_pickle(name, adapter=name)
        if not name.endswith(".safetensors"):
            raise AdapterFileError("a single-file LoRA must be a .safetensors file", adapter=name)
        if is_statistics_file(name):
            raise AdapterFileError("is a statistics file, not an adapter: name the LoRA file beside it", adapter=name)
        return Source(name=name, kind="file", path=os.path.abspath(name))
    repo_id, revision = split_revision(name)
    looks_like_path = name.startswith((".", "/", "~")) or repo_id.count("/") != 1
    if looks_like_path or name.endswith((".safetensors", *PICKLE_SUFFIXES)):
        raise AdapterFileError(f"no such file or folder: {name}", adapter=name)
    check_repo_id(repo_id, adapter=name)
    if revision is not None:
        check_revision(revision, adapter=name)
    return _resolve_hub(name, repo_id, revision, token=token, cache_dir=cache_dir)


def _resolve_hub(name: str, repo_id: str, revision: str | None, *, token, cache_dir) -> Source:
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ADAPTER_FILES,
            token=token,
            cache_dir=cache_dir,
        )
    except LocalEntryNotFoundError as e:
        raise AdapterFileError(
            f"{repo_id}@{revision or 'main'} is not in the local Hub cache and the Hub cannot be reached "
            f"(offline mode or no network): {e}",
            adapter=name,
        ) from e
    except (RepositoryNotFoundError, HfHubHTTPError, HFValidationError, ValueError, OSError) as e:
        raise AdapterFileError(f"cannot fetch {repo_id}@{revision or 'main'} from the Hub: {e}", adapter=name) from e
    # snapshot folders are named by the commit they hold, inside <cache>/models--owner--name/snapshots/.
    commit = os.path.basename(os.path.normpath(folder))
    snapshots = os.path.dirname(os.path.normpath(folder))
    if (
        not REGEX_COMMIT_HASH.fullmatch(commit)
        or os.path.basename(snapshots) != "snapshots"
        or os.path.basename(os.path.dirname(snapshots)) != "models--" + repo_id.replace("/", "--")
    ):
        raise AdapterFileError(
            f"{repo_id}@{revision or 'main'} resolved to {folder}, which is not a snapshot of that repo in the Hub "
            "cache (a corrupt cache entry?)",
            adapter=name,
        )
    has_config = os.path.isfile(os.path.join(folder, "adapter_config.json"))
    weights = [f for f in os.listdir(folder) if f.endswith(".safetensors") and not is_statistics_file(f)]
    if not weights:
        raise AdapterFileError(
            f"{repo_id}@{revision or 'main'} has no .safetensors weights (pickled .bin weights are never read)",
            adapter=name,
        )
    if has_config:
        return Source(name, "hub", folder, repo_id=repo_id, revision=revision, commit=commit)
    if len(weights) != 1:
        raise AdapterFileError(
            f"{repo_id} has no adapter_config.json and several .safetensors files {sorted(weights)}; "
            "name the file you mean as a local path",
            adapter=name,
        )
    return Source(name, "hub", os.path.join(folder, weights[0]), repo_id=repo_id, revision=revision, commit=commit)


def resolve_all(names: list[str], *, token=None, cache_dir=None, progress: bool = True) -> list[Source]:
    """Resolve every name (a progress bar when there are many); duplicates are refused.

    Args:
        names: adapter names, as ``resolve`` takes them.
        token: the Hub token.
        cache_dir: the Hub cache.
        progress: show a progress bar (only from 4 names on).

    Returns:
        One ``Source`` per name, in order.
    """
    sources = []
    seen: dict[tuple, str] = {}
    for name in tqdm(names, desc="resolving adapters", disable=not progress or len(names) < 4):
        source = resolve(name, token=token, cache_dir=cache_dir)
        identity = (source.repo_id, source.commit) if source.kind == "hub" else (os.path.realpath(source.path),)
        if identity in seen:
            raise IncompatibleAdaptersError(
                f"is the same adapter as {seen[identity]!r}; each adapter may appear once (use weights to scale)",
                adapter=name,
            )
        seen[identity] = name
        sources.append(source)
    return sources
