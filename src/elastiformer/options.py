"""One declaration of each command's options: name, type, default and help, in one table.

The command line (`elastiformer ...` options and their `--help`), `--config` YAML files and the library functions
that take an options dict (`run_lm_bench(o)`, `run_sort(o)`, ...) all read the same table, so a default, a type or
a help text is written once:

    SORT_OPTIONS = {
        "seq_len": Option(128, "Tokens per calibration sequence."),
        "output": Option("runs/flextron/sorted", "Folder for the sorted checkpoint.", kind=Path),
        "overwrite": Option(False, "Replace an existing OUTPUT."),          # a switch: --overwrite
    }
    SORT_DEFAULTS = defaults(SORT_OPTIONS)                                  # {"seq_len": 128, ...}

The CLI builds its typer commands from these tables (`elastiformer.cli.options.command`); this module does not
import typer, so library modules may declare their options here without depending on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """One option. `kind` is its value's type (int, float, str, bool, Path); it defaults to the type of `default`,
    and must be given when `default` is None. A bool option is a switch: `--name` when it defaults to False,
    `--name/--no-name` when it defaults to True or to None (the library chooses, e.g. by the model)."""

    default: Any
    help: str
    kind: type | None = None

    def __post_init__(self) -> None:
        if self.kind is None and self.default is None:
            raise TypeError("Option(None, ...) needs kind=: the type of the values it takes")

    @property
    def type(self) -> type:
        return self.kind if self.kind is not None else type(self.default)

    @property
    def switch(self) -> bool:
        return self.type is bool


def defaults(options: dict[str, Option]) -> dict[str, Any]:
    """{name: default} of an options table: what a library function's options dict holds when nothing is given."""
    return {name: option.default for name, option in options.items()}
