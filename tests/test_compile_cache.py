"""The command line's persistent compilation cache (:mod:`jaxft.compile_cache`): which folder each setting picks,
and, in subprocesses (the test processes keep the cache off, tests/conftest.py), that a second identical
``jaxft train`` loads every program from it, compiling nothing, and trains to the same losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxft.cli import build_parser
from jaxft.compile_cache import cache_dir

# Runs `jaxft ARGS...` in this process, counting jax's own compilation-cache events, and writes the counts as JSON.
COUNTING_MAIN = """
import json, sys
from collections import Counter
import jax.monitoring
from jaxft.cli import main

events = Counter()
jax.monitoring.register_event_listener(lambda event, **_: events.update([event]))
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "events": {k: v for k, v in events.items() if "compilation_cache" in k}}, f)
"""


@pytest.mark.parametrize("flag, disabled, environ, want", [
    ("/runs/xla", False, {"JAXFT_COMPILE_CACHE": "off"}, "/runs/xla"),  # the flag wins over everything
    (None, True, {"JAXFT_COMPILE_CACHE": "/env/xla"}, None),
    (None, False, {"JAXFT_COMPILE_CACHE": "off"}, None),
    (None, False, {"JAXFT_COMPILE_CACHE": "OFF "}, None),
    (None, False, {"JAXFT_COMPILE_CACHE": "/env/xla", "XDG_CACHE_HOME": "/xdg"}, "/env/xla"),
    (None, False, {"JAXFT_CACHE": "/jaxft", "XDG_CACHE_HOME": "/xdg"}, "/jaxft/xla"),
    (None, False, {"XDG_CACHE_HOME": "/xdg"}, "/xdg/jaxft/xla"),
    (None, False, {}, str(Path.home() / ".cache/jaxft/xla")),
])
def test_the_cache_folder_follows_flag_then_environment_then_the_default(flag, disabled, environ, want):
    assert cache_dir(flag, disabled, environ) == (None if want is None else Path(want))


def _train(root: Path, name: str, *args: str, env: dict | None = None) -> dict:
    """``jaxft train run.yaml --overwrite ARGS`` in a fresh Python process: its exit code and cache events."""
    result = root / f"{name}.json"
    subprocess.run([sys.executable, "-c", COUNTING_MAIN, str(result), "train", str(root / "run.yaml"), "--overwrite",
                    *args], check=True, env={**os.environ, **(env or {})}, capture_output=True, timeout=600)
    return json.loads(result.read_text())


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def _entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_second_identical_run_compiles_nothing_and_trains_the_same(tiny_run, tmp_path):
    cache = tmp_path / "xla"
    first = _train(tiny_run, "first", "--compile-cache", str(cache))  # the environment says off: the flag wins
    first_losses, entries = _losses(tiny_run / "run"), _entries(cache)
    assert first["code"] == 0
    assert first["events"].get("/jax/compilation_cache/cache_misses", 0) == len(entries) > 0
    assert "/jax/compilation_cache/cache_hits" not in first["events"]

    second = _train(tiny_run, "second", env={"JAXFT_COMPILE_CACHE": str(cache)})  # the environment's folder
    assert second["code"] == 0
    assert "/jax/compilation_cache/cache_misses" not in second["events"]  # nothing compiled and written anew
    assert second["events"]["/jax/compilation_cache/cache_hits"] >= len(entries)
    assert _entries(cache) == entries
    assert _losses(tiny_run / "run") == first_losses

    off = _train(tiny_run, "off", "--no-compile-cache", env={"JAXFT_COMPILE_CACHE": str(cache)})
    assert off["code"] == 0
    assert not any(k.endswith(("cache_hits", "cache_misses")) for k in off["events"])
    assert _losses(tiny_run / "run") == first_losses


def test_a_cache_folder_and_no_cache_together_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "run.yaml", "--compile-cache", "/tmp/xla", "--no-compile-cache"])
    assert exit_.value.code == 2
    assert "not allowed with argument --compile-cache" in capsys.readouterr().err
