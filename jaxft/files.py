"""File-system helpers for everything jaxft writes: output folders that appear whole or not at all, and files
replaced in one rename.

A folder is written into a temporary sibling and renamed over its destination (:func:`atomic_dir`), so a reader,
or a run killed mid-write, sees the old folder or the new one, never half of one. A file likewise
(:func:`atomic_file`). Nothing is replaced that the user has unless they asked for it (``overwrite``).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def occupied(path) -> bool:
    """A file or a non-empty folder is at ``path``: writing there would replace something the user has."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_output_dir(out_dir, overwrite: bool) -> Path:
    """``out_dir`` as a Path, unless something is there and ``overwrite`` is off; reads only."""
    out = Path(out_dir)
    if occupied(out) and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty; pass overwrite=True to replace it")
    return out


def _temp_beside(path: Path, make) -> Path:
    """A new ``.<name>.<random>`` path beside ``path``, made by ``make`` (mkdir or an exclusive open). Unlike
    tempfile's, its permissions follow the umask, as the folder or file that replaces ``path`` should."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


def _publish_dir(tmp: Path, out: Path):
    """Move a fully written temporary dir into place, so readers never see half a folder."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(out_dir, overwrite: bool = False):
    """``with atomic_dir(out) as tmp:`` write the folder's files into ``tmp``; on leaving the block it replaces
    ``out`` whole, in one rename, and on an error it is removed, so ``out`` is never half written or mixed. An
    existing non-empty ``out`` needs ``overwrite``."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(out, Path.mkdir)
    try:
        yield tmp
        _publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path):
    """``with atomic_file(path) as tmp:`` write ``tmp``; on leaving the block it is renamed over ``path``, on an
    error removed: a reader sees the old file or the new one, never a truncated one."""
    path = Path(path)
    tmp = _temp_beside(path, lambda p: p.open("x").close())
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def cache_root(environ=None) -> Path:
    """jaxft's cache folder (the demo's base, the CLI's compiled programs): ``$JAXFT_CACHE``, else
    ``$XDG_CACHE_HOME/jaxft``, else ``~/.cache/jaxft``."""
    environ = os.environ if environ is None else environ
    if environ.get("JAXFT_CACHE"):
        return Path(environ["JAXFT_CACHE"]).expanduser()
    xdg = environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "jaxft"
