"""Validation of adapter configs read from files: downloaded configs are hostile input.

``validate_adapter_config`` runs where an ``adapter_config.json`` or a diffusers ``lora_adapter_metadata`` object is
read (``_io.read_adapter_folder``, the single-file reader of ``compose``), so the code downstream (scale resolution,
pattern matching, export) can trust the types and ranges of the fields it uses. It refuses, naming the adapter and
the field:

- a config that is not a JSON object;
- ranks (``r``, ``rank_pattern`` values) that are not positive integers (``"3"``, ``3.0``, ``0``, ``True``);
- scales (``lora_alpha``, ``alpha_pattern`` values) that are not real numbers, are NaN/inf, or do not fit float32
  (``"5"``, ``NaN``, ``1e40``: the merged factors would be non-finite);
- mistyped fields the merge and export read (``use_rslora`` not a bool, ``base_model_name_or_path`` not a string,
  ``target_modules`` neither a string nor a list of strings, ...);
- regular expressions that cannot be matched in bounded time (``check_pattern``): peft and diffusers match
  ``target_modules`` strings and ``rank_pattern``/``alpha_pattern`` keys with Python's backtracking ``re`` against
  every module name, where a pattern such as ``(.*)*X`` never finishes.

The config is returned unchanged (the same dict) when it is valid.
"""

from __future__ import annotations

import math
import re

from .errors import AdapterFileError

try:  # the parser behind ``re.compile``: Python >= 3.11 names it ``re._parser``
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

# Bounds on patterns read from configs. With no nested or alternated repeats and at most this many unbounded
# repeats, Python's matcher is polynomial of that degree in the module-name length; module names are bounded too.
MAX_PATTERN_LENGTH = 512
MAX_PATTERN_REPEATS = 3
MAX_NAME_LENGTH = 512
_FLOAT32_MAX = 3.4028234663852886e38
_MAX_RANK = 1 << 20

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT} | (
    {_sre.POSSESSIVE_REPEAT} if hasattr(_sre, "POSSESSIVE_REPEAT") else set()
)
_GROUPREFS = {_sre.GROUPREF, _sre.GROUPREF_EXISTS} | {
    getattr(_sre, n) for n in ("GROUPREF_IGNORE",) if hasattr(_sre, n)
}


def _bad(message: str, adapter: str | None, source: str) -> AdapterFileError:
    return AdapterFileError(f"{source}: {message}", adapter=adapter)


def _walk(items, in_repeat: bool, pattern: str) -> int:
    """Number of unbounded-ish repeats (max > 1) in a parsed pattern; raises ``ValueError`` on unsafe constructs."""
    count = 0
    for op, av in items:
        if op in _REPEATS:
            _, hi, sub = av
            multi = hi > 1
            if multi and in_repeat:
                raise ValueError("a repeated group contains another repetition (nested quantifiers such as (a+)+)")
            count += multi + _walk(sub, in_repeat or multi, pattern)
        elif op is _sre.BRANCH:
            if in_repeat:
                raise ValueError("a repeated group contains alternatives (such as (a|ab)*)")
            count += sum(_walk(branch, in_repeat, pattern) for branch in av[1])
        elif op is _sre.SUBPATTERN:
            count += _walk(av[-1], in_repeat, pattern)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            count += _walk(av[1], in_repeat, pattern)
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            count += _walk(av, in_repeat, pattern)
        elif op in _GROUPREFS:
            raise ValueError("backreferences are not allowed")
    return count


def check_pattern(pattern, *, adapter: str | None = None, field: str = "pattern", wrap: str = "{}") -> str:
    """Refuse a regular expression from a config that could not be matched in bounded time; return it.

    Accepted: at most ``MAX_PATTERN_LENGTH`` characters, compilable by ``re``, no repetition nested in a repeated
    group (``(.*)*``, ``(a+)+``), no alternatives in a repeated group (``(a|ab)*``), no backreferences, and at most
    ``MAX_PATTERN_REPEATS`` repetitions in all, counted on the pattern as it is matched (``wrap``: peft matches a
    ``rank_pattern`` key ``k`` as ``(.*\\.)?(k)$``). Module names are at most ``MAX_NAME_LENGTH`` characters, so a
    match costs at most a polynomial of degree ``MAX_PATTERN_REPEATS`` in that length. Every pattern LoRA configs
    use in practice (module names, ``.*\\.(q_proj|v_proj)``, anchored exact names) passes.
    """
    if not isinstance(pattern, str):
        raise AdapterFileError(
            f"{field} must be a string, got {type(pattern).__name__} {pattern!r:.80}", adapter=adapter
        )
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise AdapterFileError(
            f"{field} pattern is {len(pattern)} characters long (at most {MAX_PATTERN_LENGTH} are accepted)",
            adapter=adapter,
        )
    try:
        re.compile(pattern)
        parsed = _sre_parse.parse(wrap.replace("{}", pattern, 1))
        repeats = _walk(parsed, False, pattern)
    except re.error as e:
        raise AdapterFileError(f"{field} {pattern!r} is not a valid regular expression ({e})", adapter=adapter) from e
    except (ValueError, RecursionError, OverflowError) as e:
        raise AdapterFileError(
            f"{field} {pattern!r} is refused: {e}; such patterns can make regular-expression matching take forever",
            adapter=adapter,
        ) from e
    if repeats > MAX_PATTERN_REPEATS:
        raise AdapterFileError(
            f"{field} {pattern!r} is refused: {repeats} repetitions when matched (at most {MAX_PATTERN_REPEATS}); "
            "such patterns can make regular-expression matching take very long",
            adapter=adapter,
        )
    return pattern


def check_name(name: str, *, adapter: str | None = None, what: str = "tensor name") -> str:
    """A module or tensor name from a file: a string of at most ``MAX_NAME_LENGTH`` characters."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:
        shown = name[:60] + "..." if isinstance(name, str) else repr(name)
        raise AdapterFileError(f"{what} {shown!r} is longer than {MAX_NAME_LENGTH} characters", adapter=adapter)
    return name


def check_rank(value, *, adapter: str | None = None, field: str = "r") -> int:
    """A LoRA rank: a positive integer (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        kind = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r:.40}"
        raise AdapterFileError(f"{field} must be a positive integer, got {kind}", adapter=adapter)
    if not 1 <= value <= _MAX_RANK:
        raise AdapterFileError(
            f"{field} must be a positive integer (at most {_MAX_RANK}), got {value}", adapter=adapter
        )
    return value


def check_scale(value, *, adapter: str | None = None, field: str = "lora_alpha") -> float:
    """A LoRA alpha (or any scale): a finite real number that fits float32, where the merge computes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r:.40}"
        raise AdapterFileError(f"{field} must be a number, got {kind}", adapter=adapter)
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise AdapterFileError(
            f"{field} = {value!r} is not a finite number that fits float32: every merged or fused weight would be "
            "NaN or infinite",
            adapter=adapter,
        )
    return value


def _check_str_list(value, field: str, adapter, allow_str: bool, wrap: str = "{}") -> None:
    if value is None:
        return
    if isinstance(value, str):
        if not allow_str:
            raise AdapterFileError(f"{field} must be a list of strings, got a string", adapter=adapter)
        check_pattern(value, adapter=adapter, field=field, wrap=wrap)
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise AdapterFileError(
            f"{field} must be {'a string or ' if allow_str else ''}a list of strings, got {value!r:.80}",
            adapter=adapter,
        )
    for v in value:
        check_name(v, adapter=adapter, what=f"{field} entry")


def _check_type(config: dict, field: str, types: tuple, adapter, what: str) -> None:
    value = config.get(field)
    if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
        raise AdapterFileError(f"{field} must be {what}, got {type(value).__name__} {value!r:.80}", adapter=adapter)


def validate_adapter_config(config, *, adapter: str | None = None, source: str = "adapter_config.json") -> dict:
    """Check the fields of a LoRA-type adapter config (a dict read from a file); return it unchanged.

    Args:
        config: the parsed ``adapter_config.json``, or one component's ``lora_adapter_metadata`` object.
        adapter: the adapter's name, for messages.
        source: what the config was read from, for messages.

    Returns:
        ``config``, known to hold: ``r`` a positive int (when present), ``lora_alpha`` a finite float32-sized number,
        ``rank_pattern``/``alpha_pattern`` dicts of safe patterns to such values, ``target_modules``/
        ``exclude_modules`` a safe pattern or a list of names, booleans where peft has booleans, string names.

    Raises:
        AdapterFileError: naming ``adapter``, ``source`` and the field.
    """
    if not isinstance(config, dict):
        raise AdapterFileError(f"{source} holds a JSON {type(config).__name__}, not an object", adapter=adapter)
    try:
        if "r" in config:
            check_rank(config["r"], adapter=None, field="r")
        if config.get("lora_alpha") is not None:
            check_scale(config["lora_alpha"], adapter=None, field="lora_alpha")
        for field, check in (("rank_pattern", check_rank), ("alpha_pattern", check_scale)):
            patterns = config.get(field)
            if patterns is None:
                continue
            if not isinstance(patterns, dict):
                raise AdapterFileError(f"{field} must be an object, got {type(patterns).__name__}", adapter=None)
            for key, value in patterns.items():
                check_pattern(key, adapter=None, field=f"{field} key", wrap=r"(.*\.)?({})$")
                check(value, adapter=None, field=f"{field}[{key!r}]")
        _check_str_list(config.get("target_modules"), "target_modules", None, allow_str=True)
        _check_str_list(config.get("exclude_modules"), "exclude_modules", None, allow_str=True)
        _check_str_list(config.get("modules_to_save"), "modules_to_save", None, allow_str=False)
        layers_pattern = config.get("layers_pattern")
        if isinstance(layers_pattern, str):
            layers_pattern = [layers_pattern]
        _check_str_list(layers_pattern, "layers_pattern", None, allow_str=False)
        for p in layers_pattern or ():
            check_pattern(p, adapter=None, field="layers_pattern")
        for field in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            _check_type(config, field, (bool,), None, "true or false")
        for field in ("peft_type", "base_model_name_or_path", "revision", "concept_id", "basis", "block_axis"):
            _check_type(config, field, (str,), None, "a string")
        for field in ("basis_seed", "num_blocks"):
            _check_type(config, field, (int,), None, "an integer")
        _check_type(config, "layers_to_transform", (int, list), None, "an integer or a list of integers")
        for field in ("basis_rows", "basis_checksums", "block_layout"):
            _check_type(config, field, (dict,), None, "an object")
        for key, rows in (config.get("basis_rows") or {}).items():
            if not isinstance(rows, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
                raise AdapterFileError(f"basis_rows[{key!r}] must be a list of integers", adapter=None)
        for key, entry in (config.get("block_layout") or {}).items():
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in entry)
            ):
                raise AdapterFileError(
                    f"block_layout[{key!r}] must be [width, start, end] (non-negative integers), got {entry!r:.80}",
                    adapter=None,
                )
    except AdapterFileError as e:
        raise AdapterFileError(f"{source}: {e}", adapter=adapter) from e
    return config
