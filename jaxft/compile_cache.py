"""The command line's persistent XLA compilation cache: compiled programs are kept on disk, so a second run of the
same config (a rerun, a resume, a sweep's next seed, ``jaxft eval`` of the same model) loads its train step, eval
step and sampler instead of compiling them again.

Where (first that applies): ``--compile-cache DIR``; ``--no-compile-cache`` (off); the environment variable
``JAXFT_COMPILE_CACHE`` (a folder, or ``off``); jax's own cache folder when the user set one
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``), which jaxft then leaves exactly as jax is configured; else
``<jaxft cache>/xla`` (:func:`jaxft.files.cache_root`: ``$JAXFT_CACHE``, ``$XDG_CACHE_HOME/jaxft`` or
``~/.cache/jaxft``).

Only commands that compile programs take part (``jaxft convert`` and ``jaxft plot`` neither take the flags nor create
the folder), and a program that imports jaxft keeps jax's own settings. In a folder jaxft chose, two of jax's
defaults change unless the user set jax's own variable for them: the folder is bounded (LRU eviction of the least
recently used entries past ``JAXFT_COMPILE_CACHE_MAX_BYTES``, 2 GiB by default, where jax's default grows without
limit), and every program is written however quickly it compiled (``MIN_COMPILE_SECS``; jax's default of 1 s skips
most of a small CPU run's programs, which made the demo's second run ~25% slower: README "Compilation cache").

jax keys each entry on the program, its shardings, the devices, the jax and backend versions and the compile
options, so a changed config or machine compiles afresh rather than reading a stale entry. In a multi-host run jax
writes entries from process 0 only; the other hosts read them when the folder is shared (a network path, or a URL
such as ``gs://bucket/xla``). A URL stays a string, handed to jax unchanged, which opens it itself (``etils[epath]``)
and creates nothing locally: ``Path`` would fold its ``//`` into a local folder ``gs:/bucket/xla``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from jaxft.errors import JaxftError
from jaxft.files import cache_root

ENV = "JAXFT_COMPILE_CACHE"
MAX_BYTES_ENV = "JAXFT_COMPILE_CACHE_MAX_BYTES"
OFF = ("off", "0", "false", "no", "none")
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
MIN_COMPILE_SECS = 0.0


def location(text: str, expand: bool = True) -> Path | str:
    """A cache location as jax will read it: a URL (``gs://bucket/xla``; jax's own test for a non-local path is
    ``://`` in it) unchanged, else a local folder (``~`` expanded where ``expand``)."""
    if "://" in text:
        return text
    return Path(text).expanduser() if expand else Path(text)


def cache_dir(flag: str | None = None, disabled: bool = False, environ=None,
              jax_dir: str | None = None) -> Path | str | None:
    """The folder (or URL) compiled programs are kept in, or None when the cache is off (module docstring: which
    setting wins); ``jax_dir`` is jax's own ``jax_compilation_cache_dir`` when the user set one."""
    environ = os.environ if environ is None else environ
    if flag is not None:
        return location(flag)
    if disabled:
        return None
    setting = environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return location(setting)
    return location(jax_dir, expand=False) if jax_dir else cache_root(environ) / "xla"


def max_bytes(environ=None) -> int:
    """The folder's bound in bytes from ``JAXFT_COMPILE_CACHE_MAX_BYTES`` (-1: no bound), else 2 GiB."""
    environ = os.environ if environ is None else environ
    text = environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    if text != "-1" and not (re.fullmatch("[0-9]+", text) and int(text) > 0):  # not str.isdigit: "²" passes it
        raise JaxftError(f"{MAX_BYTES_ENV}={text!r}: expected the compilation cache's largest size in bytes, a "
                         f"positive whole number (e.g. {4 * 1024 ** 3} for 4 GiB), or -1 for no bound")
    return int(text)


def configure(flag: str | None = None, disabled: bool = False, environ=None) -> Path | str | None:
    """Sets jax's persistent compilation cache as the flags and environment say, before the first compilation;
    returns its folder or URL (None: off)."""
    import jax

    environ = os.environ if environ is None else environ
    jax_dir = jax.config.jax_compilation_cache_dir
    folder = cache_dir(flag, disabled, environ, jax_dir)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if jax_dir and folder == location(jax_dir, expand=False):  # the user's own jax cache: theirs to configure
        return folder
    return enable(folder, environ)


def enable(folder: Path | str, environ=None) -> Path | str:
    """Points jax's persistent compilation cache at ``folder`` (a local folder, created if missing, or a URL that jax
    opens itself) with jaxft's size bound and compile-time threshold, except where the user set jax's own variable
    for one (module docstring)."""
    import jax

    environ = os.environ if environ is None else environ
    if isinstance(folder, Path):
        folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    for name, value in (("jax_compilation_cache_max_size", max_bytes(environ)),
                        ("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)):
        if name.upper() not in environ:
            jax.config.update(name, value)
    return folder
