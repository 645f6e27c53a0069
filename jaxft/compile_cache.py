"""The command line's persistent XLA compilation cache: compiled programs are kept on disk, so a second run of the
same config (a rerun, a resume, a sweep's next seed, ``jaxft eval`` of the same model) loads its train step, eval
step and sampler instead of compiling them again.

Where (first that applies): ``--compile-cache DIR``; ``--no-compile-cache`` (off); the environment variable
``JAXFT_COMPILE_CACHE`` (a folder, or ``off``); else ``<jaxft cache>/xla`` (:func:`jaxft.files.cache_root`:
``$JAXFT_CACHE``, ``$XDG_CACHE_HOME/jaxft`` or ``~/.cache/jaxft``).

Only the command line turns it on: a program that imports jaxft keeps jax's own settings. Every compiled program is
cached however quickly it compiled (jax's default skips those under a second, which on CPU is most of a small
run's), since loading one is faster still. jax keys each entry on the program, its shardings, the devices, the jax
and backend versions and the compile options, so a changed config or machine compiles afresh rather than reading
a stale entry.
"""
from __future__ import annotations

import os
from pathlib import Path

from jaxft.files import cache_root

ENV = "JAXFT_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")


def cache_dir(flag: str | None = None, disabled: bool = False, environ=None) -> Path | None:
    """The folder compiled programs are kept in, or None when the cache is off (module docstring: which setting
    wins)."""
    environ = os.environ if environ is None else environ
    if flag is not None:
        return Path(flag).expanduser()
    if disabled:
        return None
    setting = environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    return Path(setting).expanduser() if setting else cache_root(environ) / "xla"


def enable(folder: Path) -> Path:
    """Points jax's persistent compilation cache at ``folder`` (created if missing), caching every program; call
    before the first compilation."""
    import jax

    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
