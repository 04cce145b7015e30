"""`FlextronConfig`: the width menus every nested layer can run at.

Menus are fractions of a layer's MLP neurons and of its attention heads, widest first; menu index 0 must be 1.0
(the full layer, i.e. the base model exactly). A fraction `f` of `N` units keeps `max(1, floor(f * N + 0.5))` of
them (round half up), so 0.5 of SmolLM2's 9 heads is 5 heads.

Grouped-query attention (H query heads sharing KVH key/value groups of H/KVH heads each). Importance sorting puts
heads in group-major order, most important group first and, within a group, its most important head first. Then:

- `head_granularity="head"` (default): a fraction keeps that many *query heads*, the leading ones, which are whole
  groups plus possibly a leading part of the next group; the K / V projections compute only the groups those heads
  read. Fine-grained (any count 1..H) and still a leading slice of every projection.
- `head_granularity="group"`: a fraction keeps that many whole *KV groups* (all their query heads). Coarser (KVH
  choices), the paper's "whole groups" option.

A menu whose fractions round to the same count on a given model is refused by `get_flextron_model`, naming the
duplicates, because two menu entries that compute the same thing only confuse a router.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError

HEAD_GRANULARITIES = ("head", "group")
FORMAT_VERSION = 1


def _check_menu(name: str, menu: Any) -> tuple[float, ...]:
    if isinstance(menu, (str, bytes)) or not hasattr(menu, "__iter__"):
        raise ConfigError(f"{name}={menu!r}: pass a sequence of fractions, widest first, e.g. (1.0, 0.75, 0.5, 0.25)")
    values = []
    for v in menu:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)) or not 0 < float(v) <= 1:
            raise ConfigError(f"{name} has {v!r}: every entry must be a fraction in (0, 1], e.g. (1.0, 0.75, 0.5)")
        values.append(float(v))
    if not values:
        raise ConfigError(f"{name} is empty: pass at least (1.0,), the full width")
    if values[0] != 1.0:
        raise ConfigError(f"{name} starts with {values[0]}: menu index 0 must be 1.0 (the full layer = the base "
                          f"model), e.g. (1.0, {', '.join(str(v) for v in values)})")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"{name}={tuple(values)} is not strictly decreasing: list each width once, widest first")
    return tuple(values)


def menu_counts(name: str, menu: tuple[float, ...], n_units: int, unit: str) -> tuple[int, ...]:
    """How many of `n_units` each menu fraction keeps (round half up, at least one); refuses duplicates."""
    counts = tuple(max(1, math.floor(f * n_units + 0.5)) for f in menu)
    for i in range(1, len(counts)):
        if counts[i] == counts[i - 1]:
            raise ConfigError(f"{name} fractions {menu[i - 1]} and {menu[i]} both keep {counts[i]} of this model's "
                              f"{n_units} {unit}: drop one, or pick fractions further apart")
    return counts


@dataclass
class FlextronConfig:
    mlp_widths: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # fractions of each MLP's hidden neurons, widest first
    head_widths: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # fractions of each attention's heads, widest first
    head_granularity: str = "head"  # "head": count query heads (group-major); "group": count whole KV groups

    def __post_init__(self) -> None:
        self.mlp_widths = _check_menu("mlp_widths", self.mlp_widths)
        self.head_widths = _check_menu("head_widths", self.head_widths)
        if self.head_granularity not in HEAD_GRANULARITIES:
            raise ConfigError(f"head_granularity={self.head_granularity!r}: pass 'head' (query heads, group-major) "
                              "or 'group' (whole KV groups)")

    @property
    def n_mlp_choices(self) -> int:
        return len(self.mlp_widths)

    @property
    def n_attn_choices(self) -> int:
        return len(self.head_widths)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d | {"mlp_widths": list(self.mlp_widths), "head_widths": list(self.head_widths)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlextronConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown FlextronConfig keys {unknown}: the keys are {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
