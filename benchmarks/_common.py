"""Helpers shared by the benchmark scripts: peak-memory measurement and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import os

HEADER = "# Benchmarks\n"


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0
        return True
    except OSError:
        return False


def write_section(path: str, start: str, end: str, text: str) -> None:
    """Replace the text between ``start`` and ``end`` markers in ``path`` (append the block if absent), atomically."""
    content = open(path).read() if os.path.exists(path) else HEADER
    block = f"{start}\n{text}\n{end}"
    if start in content and end in content:
        content = content[: content.index(start)] + block + content[content.index(end) + len(end) :]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(content)
    os.replace(tmp, path)
