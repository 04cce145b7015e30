"""Results sections of the README: the text between `<!-- results:NAME -->` and `<!-- /results:NAME -->`, rewritten
from a benchmark's JSON (every benchmark's `--readme` goes through here)."""

from __future__ import annotations

from pathlib import Path

from ..cache import atomic_write_text
from ..errors import ConfigError


def replace_readme_section(readme: Path, marker: str, markdown: str) -> None:
    """Put `markdown` between the README's `results:<marker>` markers (written atomically)."""
    start, end = f"<!-- results:{marker} -->", f"<!-- /results:{marker} -->"
    text = Path(readme).read_text()
    if start not in text or end not in text:
        raise ConfigError(f"{readme} has no '{start}' ... '{end}' markers: add them where the results go")
    body = f"{start}\n{markdown.rstrip(chr(10))}\n{end}"
    atomic_write_text(readme, text[: text.index(start)] + body + text[text.index(end) + len(end):])
