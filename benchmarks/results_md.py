"""benchmarks/RESULTS.md is shared: each benchmark owns one section between its own markers and
replaces only that section."""
from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the text from `begin` to `end` in path (section carries both markers), or append it if the
    markers are not there yet. The file is replaced atomically; other sections are left as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
