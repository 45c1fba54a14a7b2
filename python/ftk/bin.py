"""Locating the ftk binaries (fed-aggregate, route-hist, mem-plan).

Order: the directory in $FTK_BIN, then $PATH, then target/release of an ftk
checkout (the one this package sits in when installed editable or run from the
tree, else the nearest one above the working directory). The choice is logged
once per tool at INFO on the "ftk" logger and kept in `found`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("ftk")

#: tool -> (path, how it was found), filled by find_binary.
found: dict[str, tuple[str, str]] = {}


class BinaryNotFound(RuntimeError):
    """No usable binary; the message says where we looked and what to do."""


def _checkouts() -> list[Path]:
    roots = []
    here = Path(__file__).resolve().parent
    for start in (here, Path.cwd().resolve()):
        for d in (start, *start.parents):
            if (d / "Cargo.toml").is_file() and (d / "tools").is_dir():
                roots.append(d)
                break
    return roots


def find_binary(tool: str) -> str:
    """Absolute path of `tool`, or BinaryNotFound explaining what to do."""
    if tool in found:
        return found[tool][0]
    looked = []
    env = os.environ.get("FTK_BIN")
    if env:
        p = Path(env) / tool
        if p.is_file() and os.access(p, os.X_OK):
            return _use(tool, str(p), f"FTK_BIN={env}")
        looked.append(f"FTK_BIN={env} (no executable {tool} there)")
    else:
        looked.append("FTK_BIN (unset)")
    p = shutil.which(tool)
    if p:
        return _use(tool, p, "PATH")
    looked.append("PATH")
    for root in _checkouts():
        p = root / "target" / "release" / tool
        if p.is_file() and os.access(p, os.X_OK):
            return _use(tool, str(p), f"checkout {root}")
        looked.append(str(p.parent))
    raise BinaryNotFound(
        f"{tool} not found; looked in {', '.join(looked)}. Build it with "
        f"`cargo build --release -p {tool}` in the ftk checkout (the package then finds "
        f"target/release), put it on PATH, or set FTK_BIN to the directory holding it."
    )


def _use(tool: str, path: str, how: str) -> str:
    found[tool] = (path, how)
    log.info("ftk: using %s from %s (%s)", tool, how, path)
    return path
