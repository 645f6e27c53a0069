"""The sweep's grid language: ``--grid`` items parsed into axes, and the grid expanded into validated runs.

- ``KEY=V1,V2,...`` is one grid dimension; values are YAML scalars (``1e-4``, ``true``, ``[q_proj, v_proj]``).
  ``r``, ``alpha``, ``lr`` and ``dropout`` are short for ``lora.r``, ``lora.lora_alpha``, ``optim.lr`` and
  ``lora.lora_dropout``.
- A value ``2r`` / ``2*r`` / ``r`` is derived from each point's ``lora.r`` (``alpha=r,2r`` is a dimension of two
  rules).
- ``seeds=N`` runs every point with ``train.seed`` = 0 .. N-1.

Every point is named after its values (``r8-a16-lr0.0001-s0``), the name of its folder inside the sweep folder.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from jaxft.config import ConfigError, from_dict
from jaxft.recipes.config import RunConfig, apply_overrides, lookup

ALIASES = {"r": "lora.r", "alpha": "lora.lora_alpha", "lr": "optim.lr", "dropout": "lora.lora_dropout"}
SHORT_NAMES = {"lora.r": "r", "lora.lora_alpha": "a", "optim.lr": "lr", "lora.lora_dropout": "do", "train.seed": "s"}
SEED_KEY, R_KEY, ALPHA_KEY = "train.seed", "lora.r", "lora.lora_alpha"
GRID_FORM = ("expected KEY=V1,V2,... with YAML values (lora.r=4,8,16 or optim.lr=1e-4,3e-4), a rule derived from "
             "each point's lora.r (lora.lora_alpha=2r, alpha=2*r, alpha=r), or seeds=N")
_RULE = re.compile(r"^(?:(\d+(?:\.\d+)?)\s*\*?\s*)?r$")
_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # YAML 1.1 reads 1e-4 (no dot) as a string


@dataclass(frozen=True)
class Axis:
    """One grid dimension: a dotted RunConfig key and its values as written (``"8"``, ``"1e-4"``, ``"2r"``)."""

    key: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One point of the grid: its folder name, the name of its seed group, and its overrides."""

    name: str
    group: str
    items: dict[str, str]      # key -> value as written (a rule stays "2r": the heatmap's column label)
    values: dict[str, object]  # key -> the value the run gets (a rule resolved against the point's r)
    config: RunConfig


def parse_grid(specs: list[str]) -> tuple[Axis, ...]:
    """``["lora.r=4,8", "alpha=2r", "seeds=2"]`` -> axes; the seed axis, when there is one, comes last."""
    if not specs:
        raise ConfigError(f"--grid: no grid given; {GRID_FORM}")
    axes = [_parse_axis(spec) for spec in specs]
    keys = [a.key for a in axes]
    for key in keys:
        if keys.count(key) > 1:
            form = "seeds=N or train.seed=V1,V2,..." if key == SEED_KEY else f"{key}=V1,V2,..."
            raise ConfigError(f"--grid: {key} (or an alias of it) appears {keys.count(key)} times; give all its "
                              f"values in one item ({form})")
    return tuple(sorted(axes, key=lambda a: a.key == SEED_KEY))


def _parse_axis(spec: str) -> Axis:
    key, sep, text = spec.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    items = _split_top_level(text.strip())
    if not sep or not key or not all(items):
        raise ConfigError(f"--grid {spec!r}: {GRID_FORM}")
    if key == "seeds":
        if len(items) != 1 or not items[0].isdigit() or int(items[0]) < 1:
            raise ConfigError(f"--grid {spec!r}: seeds takes one whole number >= 1 (seeds=3 runs train.seed 0, 1, 2)")
        return Axis(SEED_KEY, tuple(str(i) for i in range(int(items[0]))))
    if key == "output_dir":
        raise ConfigError(f"--grid {spec!r}: every run gets its own folder inside the sweep folder; choose that "
                          "with --out")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ConfigError(f"--grid {spec!r}: {', '.join(repeated)} given more than once; list each value once")
    for item in items:
        if _RULE.match(item) and key == R_KEY:
            raise ConfigError(f"--grid {spec!r}: lora.r cannot be derived from itself; give numbers (lora.r=4,8)")
        if not _RULE.match(item):
            _yaml_value(item, spec)
    return Axis(key, tuple(items))


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets, so a list value (``[q_proj,v_proj]``) stays one item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return items + [text[start:].strip()]


def _yaml_value(item: str, spec: str):
    try:
        return yaml.safe_load(item)
    except yaml.YAMLError as e:
        raise ConfigError(f"--grid {spec!r}: value {item!r} is not plain YAML ({getattr(e, 'problem', e)}); "
                          f"{GRID_FORM}") from None


def _resolve(item: str, r) -> object:
    """A written value -> the value a run gets; ``2r`` with r = 8 -> 16 (an int when it is whole)."""
    rule = _RULE.match(item)
    if not rule:
        value = yaml.safe_load(item)
        return float(value) if isinstance(value, str) and _EXPONENT.match(value) else value
    value = float(rule.group(1) or 1) * r
    return int(value) if value == int(value) else value


def format_value(value) -> str:
    text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else (
        f"{value:g}" if isinstance(value, float) else str(value))
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _short_names(keys: list[str]) -> dict[str, str]:
    """Folder-name prefix per key: a known short name, else the last key part, else (ambiguous) the whole key."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: SHORT_NAMES.get(k, part if last.count(part) == 1 else k) for k, part in zip(keys, last)}


def expand(base_tree: dict, axes: tuple[Axis, ...], out: Path, source: str, origins: dict | None = None) -> list[Run]:
    """Every point of the grid as a validated RunConfig with ``output_dir = out/<name>``; ``origins`` are the
    ``--set`` overrides in ``base_tree`` (a bad value is blamed on its ``--set`` or ``--grid`` item)."""
    short = _short_names([a.key for a in axes])
    origins = dict(origins or {})
    base_lora = from_dict(RunConfig, copy.deepcopy(base_tree), source=source, origins=origins).lora
    base_r = base_lora.r if base_lora else None  # a run without LoRA has no r for an alpha rule to follow
    runs = []
    for point in itertools.product(*(a.items for a in axes)):
        items = {a.key: item for a, item in zip(axes, point)}
        r = _resolve(items[R_KEY], None) if R_KEY in items else base_r
        if any(_RULE.match(item) for item in items.values()) and (
                isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0):
            raise ConfigError(f"--grid point {items}: {', '.join(i for i in items.values() if _RULE.match(i))} "
                              f"is derived from lora.r, which is {r!r} here; give lora.r positive whole numbers")
        values = {key: _resolve(item, r) for key, item in items.items()}
        parts = {key: f"{short[key]}{format_value(v)}" for key, v in values.items()}
        group = "-".join(p for key, p in parts.items() if key != SEED_KEY) or "base"
        name = "-".join(parts.values())
        twin = next((other for other in runs if other.name == name), None)
        if twin is not None:
            raise ConfigError(f"--grid: the points {twin.items} and {items} give the same run ({name}); drop one "
                              "of the values")
        tree = apply_overrides(copy.deepcopy(base_tree), [f"{k}={json.dumps(v)}" for k, v in values.items()],
                               source=f"--grid ({name})")
        tree["output_dir"] = str(out / name)
        point = {**origins, **{k: (f"--grid {k}={item}", lookup(base_tree, k)) for k, item in items.items()}}
        try:
            config = from_dict(RunConfig, tree, source=source, origins=point)
        except ConfigError as e:
            raise ConfigError(f"{e} (grid point {name})" if str(e).startswith("--grid") else
                              f"--grid point {name}: {e}") from None
        runs.append(Run(name, group, items, values, config))
    return runs
