"""`pip install ./python` and how the package finds the binaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PY = Path(__file__).resolve().parents[1]
PROBE = "import ftk, ftk.bin as b; print(b.find_binary('route-hist')); print(b.found['route-hist'][1])"


def _bin_dir() -> Path:
    from ftk import find_binary

    return Path(find_binary("route-hist")).parent


def test_pip_install_and_binary_discovery(tmp_path):
    site = tmp_path / "site"
    p = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(PY)],
        capture_output=True, text=True,
    )
    assert p.returncode == 0, p.stderr
    assert (site / "ftk" / "flwr.py").exists() and (site / "ftk" / "trace.py").exists()
    bins = _bin_dir()
    base = {k: v for k, v in os.environ.items() if k not in ("FTK_BIN", "PYTHONPATH")}
    base["PYTHONPATH"] = str(site)
    base["PATH"] = "/usr/bin:/bin"

    def probe(env):
        # Run outside the checkout, so the installed copy cannot find target/ by location.
        return subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True)

    r = probe(base)
    assert r.returncode != 0
    msg = r.stderr.strip().splitlines()[-1]
    assert "route-hist not found" in msg and "FTK_BIN (unset)" in msg and "cargo build --release -p route-hist" in msg, msg

    r = probe(base | {"FTK_BIN": str(bins)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(bins / "route-hist"), f"FTK_BIN={bins}"]

    r = probe(base | {"PATH": f"{bins}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(bins / "route-hist"), "PATH"]

    # From inside a checkout with target/release, that checkout's binaries.
    if (PY.parent / "target" / "release" / "route-hist").exists():
        r = subprocess.run([sys.executable, "-c", PROBE], env=base, cwd=PY.parent / "tools", capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == str(PY.parent / "target" / "release" / "route-hist")
