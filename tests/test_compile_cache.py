"""The command line's persistent compilation cache (:mod:`jaxft.compile_cache`): which folder each setting picks,
its size bound's setting, that commands which compile nothing neither take its flags nor create its folder, and, in
subprocesses (the test processes keep the cache off, tests/conftest.py), that a second identical ``jaxft train``
loads every program from it (also from jax's own folder, set by the user), compiling nothing, and trains to the
same losses, and that a bounded folder stays within its bound on disk."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxft.cli import build_parser, main
from jaxft.compile_cache import DEFAULT_MAX_BYTES, MAX_BYTES_ENV, MIN_COMPILE_SECS, cache_dir, configure, max_bytes
from jaxft.errors import JaxftError

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


@pytest.mark.parametrize("flag, disabled, environ, jax_dir, want", [
    ("/runs/xla", False, {"JAXFT_COMPILE_CACHE": "off"}, "/jax", "/runs/xla"),  # the flag wins over everything
    (None, True, {"JAXFT_COMPILE_CACHE": "/env/xla"}, "/jax", None),
    (None, False, {"JAXFT_COMPILE_CACHE": "off"}, "/jax", None),
    (None, False, {"JAXFT_COMPILE_CACHE": "OFF "}, None, None),
    (None, False, {"JAXFT_COMPILE_CACHE": "/env/xla", "XDG_CACHE_HOME": "/xdg"}, "/jax", "/env/xla"),
    (None, False, {"JAXFT_CACHE": "/jaxft", "XDG_CACHE_HOME": "/xdg"}, "/jax", "/jax"),  # the user's jax setting
    (None, False, {"JAXFT_CACHE": "/jaxft", "XDG_CACHE_HOME": "/xdg"}, None, "/jaxft/xla"),
    (None, False, {"XDG_CACHE_HOME": "/xdg"}, None, "/xdg/jaxft/xla"),
    (None, False, {}, None, str(Path.home() / ".cache/jaxft/xla")),
])
def test_the_cache_folder_follows_flag_then_environment_then_jax_then_the_default(flag, disabled, environ, jax_dir,
                                                                                   want):
    assert cache_dir(flag, disabled, environ, jax_dir) == (None if want is None else Path(want))


@pytest.mark.parametrize("flag, environ", [("gs://bucket/runs/xla", {}), (None, {"JAXFT_COMPILE_CACHE": "gs://b/xla"}),
                                           ("s3://bucket/xla", {"JAXFT_COMPILE_CACHE": "/env/xla"})])
def test_a_url_is_handed_to_jax_unchanged_and_nothing_is_created_locally(flag, environ, jax_cache_settings, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # Path("gs://b/x") is the relative folder gs:/b/x: it would appear here
    url = flag or environ["JAXFT_COMPILE_CACHE"]
    assert cache_dir(flag, False, environ) == url
    assert configure(flag, environ={**environ, "JAXFT_CACHE": str(tmp_path / "jaxft")}) == url
    assert jax_cache_settings.jax_compilation_cache_dir == url
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, environ, theirs, want", [
    ("flag", {"JAXFT_COMPILE_CACHE": "env"}, "theirs", "flag"),  # the flag wins over everything
    (None, {"JAXFT_COMPILE_CACHE": "env"}, "theirs", "env"),  # then jaxft's variable, over the user's jax folder
    (None, {}, None, "home/xla"),  # else jaxft's cache folder
])
def test_configure_points_jax_at_the_winning_folder_with_jaxfts_bound_and_threshold(flag, environ, theirs, want,
                                                                                    jax_cache_settings, tmp_path):
    jax_cache_settings.update("jax_compilation_cache_dir", theirs and str(tmp_path / theirs))
    jax_cache_settings.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # jax's default
    environ = {**{k: str(tmp_path / v) for k, v in environ.items()}, "JAXFT_CACHE": str(tmp_path / "home")}
    folder = configure(flag and str(tmp_path / flag), environ=environ)
    assert folder == tmp_path / want and folder.is_dir()
    assert jax_cache_settings.jax_compilation_cache_dir == str(tmp_path / want)
    assert jax_cache_settings.jax_compilation_cache_max_size == DEFAULT_MAX_BYTES
    assert jax_cache_settings.jax_persistent_cache_min_compile_time_secs == MIN_COMPILE_SECS == 0
    assert [p.name for p in tmp_path.iterdir()] == [Path(want).parts[0]]  # no other folder created


def test_configure_leaves_the_users_own_jax_folder_as_they_configured_it(jax_cache_settings, tmp_path):
    theirs = str(tmp_path / "theirs")  # JAX_COMPILATION_CACHE_DIR, which jax reads into its config at import
    for name, value in (("jax_compilation_cache_dir", theirs), ("jax_compilation_cache_max_size", 123),
                        ("jax_persistent_cache_min_compile_time_secs", 5.0)):
        jax_cache_settings.update(name, value)
    assert configure(environ={"JAXFT_CACHE": str(tmp_path / "home")}) == Path(theirs)
    assert jax_cache_settings.jax_compilation_cache_dir == theirs
    assert jax_cache_settings.jax_compilation_cache_max_size == 123
    assert jax_cache_settings.jax_persistent_cache_min_compile_time_secs == 5.0
    assert list(tmp_path.iterdir()) == []  # neither their folder (jax makes it) nor jaxft's


def test_the_users_jax_variables_win_over_jaxfts_bound_and_threshold(jax_cache_settings, tmp_path):
    jax_cache_settings.update("jax_compilation_cache_max_size", 123)  # as jax read them from the environment
    jax_cache_settings.update("jax_persistent_cache_min_compile_time_secs", 5.0)
    environ = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "5", "JAX_COMPILATION_CACHE_MAX_SIZE": "123"}
    assert configure(str(tmp_path / "xla"), environ=environ) == tmp_path / "xla"
    assert jax_cache_settings.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax_cache_settings.jax_compilation_cache_max_size == 123
    assert jax_cache_settings.jax_persistent_cache_min_compile_time_secs == 5.0


@pytest.mark.parametrize("disabled, environ", [(True, {"JAXFT_COMPILE_CACHE": "/env/xla"}),
                                               (False, {"JAXFT_COMPILE_CACHE": "off"})])
def test_turning_the_cache_off_turns_off_jaxs_own_folder_too(disabled, environ, jax_cache_settings, tmp_path):
    jax_cache_settings.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    jax_cache_settings.update("jax_enable_compilation_cache", True)
    assert configure(disabled=disabled, environ=environ) is None
    assert jax_cache_settings.jax_enable_compilation_cache is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, want", [(None, 2 * 1024 ** 3), ("1048576", 1048576), (" 4096 ", 4096), ("-1", -1)])
def test_the_size_bound_is_2_gib_unless_the_environment_sets_bytes_or_no_bound(text, want):
    assert max_bytes({} if text is None else {MAX_BYTES_ENV: text}) == want == (DEFAULT_MAX_BYTES if text is None
                                                                                else int(text))


@pytest.mark.parametrize("text", ["0", "-2", "--5", "-0", "+5", "²", "2GiB", "1e9", "lots"])
def test_a_size_bound_that_is_no_positive_byte_count_is_refused_by_name(text):
    with pytest.raises(JaxftError, match=re.escape(f"{MAX_BYTES_ENV}={text!r}: expected") + ".* bytes"):
        max_bytes({MAX_BYTES_ENV: text})


@pytest.mark.parametrize("argv", [["convert", "model.gguf", "--out", "hf"], ["plot", "runs/a", "--out", "a.png"],
                                  ["data", "tokenize", "run.yaml"]])
def test_commands_that_compile_nothing_refuse_the_cache_flags(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--compile-cache", "/tmp/xla"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --compile-cache" in capsys.readouterr().err


def test_convert_leaves_the_cache_folder_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXFT_COMPILE_CACHE", str(tmp_path / "xla"))
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "jaxft"))
    assert main(["convert", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "hf")]) != 0
    assert "missing.gguf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

JAXFTS_THRESHOLD = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": None}  # unset: jaxft's MIN_COMPILE_SECS applies


def _train(root: Path, name: str, *args: str, env: dict | None = None) -> dict:
    """``jaxft train run.yaml --overwrite ARGS`` in a fresh Python process (``env`` added to the environment, a None
    value unsetting its variable): its exit code and cache events."""
    result = root / f"{name}.json"
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset
    subprocess.run([sys.executable, "-c", COUNTING_MAIN, str(result), "train", str(root / "run.yaml"), "--overwrite",
                    *args], check=True, env=environ, capture_output=True, timeout=600)
    return json.loads(result.read_text())


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def _entries(folder: Path) -> dict[str, int]:
    """Compiled programs in a cache folder (jax's ``*-cache`` files, beside its access times and lock): size by name."""
    return {p.name: p.stat().st_size for p in folder.glob("*-cache")}


@pytest.mark.slow
def test_a_second_identical_run_compiles_nothing_and_trains_the_same(tiny_run, tmp_path):
    cache = tmp_path / "xla"
    # jaxft's own threshold (MIN_COMPILE_SECS, 0; jax's variable unset) keeps every program the tiny model compiles
    first = _train(tiny_run, "first", "--compile-cache", str(cache), env=JAXFTS_THRESHOLD)  # the environment says off
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

    # jax's own folder, set by the user, is the one jaxft uses: all hits, and jaxft's default folder is not made
    home = tmp_path / "jaxft-home"
    theirs = _train(tiny_run, "theirs", env={"JAXFT_COMPILE_CACHE": None, "JAX_COMPILATION_CACHE_DIR": str(cache),
                                             "JAXFT_CACHE": str(home)})
    assert theirs["code"] == 0 and not home.exists()
    assert "/jax/compilation_cache/cache_misses" not in theirs["events"]
    assert theirs["events"]["/jax/compilation_cache/cache_hits"] >= len(entries)

    off = _train(tiny_run, "off", "--no-compile-cache", env={"JAX_COMPILATION_CACHE_DIR": str(cache)})
    assert off["code"] == 0
    assert not any(k.endswith(("cache_hits", "cache_misses")) for k in off["events"])
    assert _losses(tiny_run / "run") == first_losses


@pytest.mark.slow
def test_a_bounded_cache_folder_stays_within_its_bound_by_evicting_entries(tiny_run, tmp_path):
    unbounded, bounded = tmp_path / "all", tmp_path / "bounded"
    unbound = {**JAXFTS_THRESHOLD, MAX_BYTES_ENV: "-1"}  # jaxft's own threshold (0) writes every program
    assert _train(tiny_run, "all", "--compile-cache", str(unbounded), env=unbound)["code"] == 0
    sizes = _entries(unbounded)
    bound = sum(sizes.values()) // 2
    assert bound >= max(sizes.values())  # every entry fits on its own: the bound evicts, it does not refuse
    run = _train(tiny_run, "bounded", "--compile-cache", str(bounded), env={**unbound, MAX_BYTES_ENV: str(bound)})
    assert run["code"] == 0
    written = run["events"]["/jax/compilation_cache/cache_misses"]  # each fits the bound, so each was written
    assert written >= len(sizes)
    kept = _entries(bounded)
    assert 0 < sum(kept.values()) <= bound
    assert len(kept) < written  # the oldest were deleted to make room


def test_a_cache_folder_and_no_cache_together_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "run.yaml", "--compile-cache", "/tmp/xla", "--no-compile-cache"])
    assert exit_.value.code == 2
    assert "not allowed with argument --compile-cache" in capsys.readouterr().err
