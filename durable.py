"""Durability: what makes a killed or failed job leave nothing wrong behind, for every script (standard library only,
so that `python -m prepare` and its workers never load torch).

- write_atomic: every file or folder a script writes appears whole or not at all (temporary name, then rename);
- die_with_parent: a worker process does not outlive a killed parent;
- kill_point: the tests kill a job at a known point (PFTSLEEP_KILL_AFTER_<WHAT>) instead of after a sleep.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
from pathlib import Path


def write_atomic(path: str | Path, write, previous: str | Path | None = None) -> None:
    """write(temporary_path) creates a file or a folder, which then replaces `path` in one rename. On any error
    (a full disk included) nothing is left but the old `path`; a kill between the two steps can leave a hidden
    `.name.tmp-PID`, never a partial `path`. With `previous`, the old file is first renamed to it (kept as a
    fallback)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        if previous is not None and path.exists():
            os.replace(path, previous)
        if temp.is_dir() and path.exists():      # a folder (a night store) replacing an older one: swap, then delete
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            temp.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(temp, path)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def die_with_parent(parent: int) -> None:
    """Worker-process initializer (prepare --workers, predict.py --workers): a worker must not outlive a killed parent
    (SIGKILL leaves the parent no time to stop its pool).
    Linux: the kernel kills the worker when its parent dies (PR_SET_PDEATHSIG); elsewhere nothing is set."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # the parent died before prctl took effect
        os._exit(1)


def kill_point(what: str, count: int) -> None:
    """For the kill-and-resume tests: with PFTSLEEP_KILL_AFTER_<WHAT>=k in the environment (e.g. _STEP, _NIGHT), the
    process SIGKILLs itself when `count` reaches k, at a known point instead of after a sleep."""
    if os.environ.get(f"PFTSLEEP_KILL_AFTER_{what.upper()}") == str(count):
        os.kill(os.getpid(), signal.SIGKILL)
