"""JAX's persistent compilation cache for the ``stem-live`` command: what one process compiled,
the next one loads from disk instead of compiling again (the gp model's first frame: ~10-25 s
cold on a 2-core CPU, a few seconds warm).

Where: ``$STEM_LIVE_JAX_CACHE`` when set ("off", "0" or "" turns the cache off), else
``$XDG_CACHE_HOME/stem-live/jax``, else ``~/.cache/stem-live/jax``. :func:`enable` is called by
the command's entry point (``stem_live.cli.app.main``), never at import: importing
``stem_live`` imports no JAX. The tests turn it off (``tests/conftest.py``).

Two processes sharing the folder (JAX 0.10): every entry is one file named by a hash of the
computation, the compiler and its options, written once (an existing entry is never
overwritten); an entry that cannot be read, e.g. one another process is still writing, is a
miss: JAX warns and compiles. The writes are plain, not atomic renames: two processes writing
the same new entry at the same moment normally write the same bytes (XLA compiles
deterministically); were one entry torn, it would read as a miss at every start (a warning and a
compilation) until the folder is deleted, never as a wrong program. The folder is not bounded:
JAX's size cap (LRU eviction) keeps a second ``-atime`` file per entry, and one entry without it
(written without the cap, or half-deleted) makes every later write fail (jax-ml/jax#39880);
delete the folder to reclaim its space.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["ENV", "cache_dir", "enable"]

ENV = "STEM_LIVE_JAX_CACHE"
_OFF = {"", "off", "0", "no", "false", "none"}


def cache_dir(environ: dict | None = None) -> Path | None:
    """The cache folder this process would use (None: the cache is off); see the module doc."""
    env = os.environ if environ is None else environ
    if ENV in env:
        value = env[ENV].strip()
        return None if value.lower() in _OFF else Path(value).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "stem-live" / "jax"


def enable(path: Path | None = None, *, min_compile_s: float = 0.0) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`cache_dir`).

    Every compilation that took at least ``min_compile_s`` seconds is kept, whatever its size.
    Set through JAX's environment variables (``JAX_COMPILATION_CACHE_DIR`` ...), read when JAX
    is first imported (also by child processes), and through ``jax.config`` where JAX is
    imported already. A folder that cannot be created leaves the cache off, with one line on
    stderr. Returns the folder in use, or None."""
    path = cache_dir() if path is None else path
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"stem-live: warning: no compilation cache ({exc}); every start compiles", file=sys.stderr)
        return None
    settings = {
        "jax_compilation_cache_dir": str(path),
        "jax_persistent_cache_min_compile_time_secs": float(min_compile_s),
        "jax_persistent_cache_min_entry_size_bytes": -1,  # every entry, however small
    }
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
    if "jax" in sys.modules:
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
    return path
