#!/usr/bin/env python3
"""Benchmark fed-embed's k-means and subspace (SVD) against scikit-learn / numpy.

Data: N x D float32 features (default 100000 x 512): 64 Gaussian blobs plus
noise, from numpy.random.default_rng(7), written once to bench/out/.

* k-means, fixed init (the same Lloyd work on both sides):
    ftk:     `fed-embed cluster --no-labels --k K --init INIT --max-iter I --tol 0`
    sklearn: KMeans(K, init=INIT, n_init=1, max_iter=I, tol=0, algorithm="lloyd")
  Both start from the same centroids; iterations and inertia are printed and
  must agree (inertia within 1e-3 relative).
* k-means, k-means++ init (n_init=1, max_iter=I): the whole job, as run.
* subspace, rank r:
    ftk:     `fed-embed subspace --rank r` (f64 Gram blocks + faer eigh)
    numpy:   np.linalg.svd(X, full_matrices=False) (LAPACK gesdd, float32), and
    numpy:   np.linalg.eigh(X.T @ X) (the same algorithm as ftk, float32 Gram)
  Projector distance |P_ftk - P_numpy|_max is printed.

ftk is timed as a whole process (start-up, reading the safetensors file,
writing the output); the Python peers in-process from data already in memory
(which favours them). Thread counts are each library's default (all cores).
One JSON line per measurement, with `ratio` = peer seconds / ftk seconds
(> 1: ftk faster). Best of --reps.

    cargo build --release -p fed-embed
    .venv/bin/python bench/fed_embed_bench.py [--n 100000] [--d 512] [--k 64] [--iters 20] [--rank 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.cluster import KMeans

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "fed-embed"


def data(n: int, d: int, path: Path) -> np.ndarray:
    if path.exists():
        return load_file(path)["features"]
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((64, d)).astype(np.float32) * 3
    x = centers[rng.integers(0, 64, n)] + rng.standard_normal((n, d), dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": x}, path)
    return x


def best(fn, reps):
    ts, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def ftk(args: list[str]) -> dict:
    o = subprocess.run([str(BIN), *args], capture_output=True, text=True)
    if o.returncode != 0:
        sys.exit(f"fed-embed failed: {o.stderr}")
    return json.loads(o.stdout)


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if not BIN.exists():
        sys.exit(f"{BIN} missing: cargo build --release -p fed-embed")
    feat = ROOT / "bench" / "out" / f"fed_embed_{a.n}x{a.d}.safetensors"
    x = data(a.n, a.d, feat)
    ok = True
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        init = x[np.random.default_rng(1).choice(a.n, a.k, replace=False)].copy()
        save_file({"centroids": init}, td / "init.safetensors")
        out = td / "c.safetensors"
        common = ["cluster", "--features", str(feat), "--no-labels", "--k", str(a.k), "--max-iter", str(a.iters)]
        t_f, s_f = best(lambda: ftk([*common, "--init", str(td / "init.safetensors"), "--tol", "0", "-o", str(out)]), a.reps)
        t_s, km = best(lambda: KMeans(a.k, init=init, n_init=1, max_iter=a.iters, tol=0.0, algorithm="lloyd").fit(x), a.reps)
        agree = abs(s_f["inertia"] / km.inertia_ - 1) < 1e-3
        ok &= agree
        emit({"kind": "bench", "what": "kmeans_fixed_init", "n": a.n, "d": a.d, "k": a.k, "max_iter": a.iters,
              "ftk_s": round(t_f, 4), "sklearn_s": round(t_s, 4), "ratio": round(t_s / t_f, 2),
              "ftk_inertia": s_f["inertia"], "sklearn_inertia": float(km.inertia_),
              "sklearn_iters": int(km.n_iter_), "inertia_agree": agree})
        t_f, s_f = best(lambda: ftk([*common, "--seed", "0", "-o", str(out)]), a.reps)
        t_s, km = best(lambda: KMeans(a.k, n_init=1, max_iter=a.iters, random_state=0, algorithm="lloyd").fit(x), a.reps)
        emit({"kind": "bench", "what": "kmeans_plusplus", "n": a.n, "d": a.d, "k": a.k, "max_iter": a.iters,
              "ftk_s": round(t_f, 4), "sklearn_s": round(t_s, 4), "ratio": round(t_s / t_f, 2),
              "ftk_inertia": s_f["inertia"], "sklearn_inertia": float(km.inertia_)})

        bo = td / "b.safetensors"
        t_f, _ = best(lambda: ftk(["subspace", "--features", str(feat), "--rank", str(a.rank), "-o", str(bo)]), a.reps)
        u_f = load_file(bo)["basis"].astype(np.float64)
        p_f = u_f @ u_f.T
        t_svd, (_, _, vt) = best(lambda: np.linalg.svd(x, full_matrices=False), a.reps)
        u_s = vt[: a.rank].T.astype(np.float64)
        dist_svd = float(np.abs(p_f - u_s @ u_s.T).max())
        t_eig, (_, v) = best(lambda: np.linalg.eigh(x.T @ x), a.reps)
        u_e = v[:, ::-1][:, : a.rank].astype(np.float64)
        dist_eig = float(np.abs(p_f - u_e @ u_e.T).max())
        ok &= dist_svd < 1e-3
        emit({"kind": "bench", "what": "subspace_vs_numpy_svd", "n": a.n, "d": a.d, "rank": a.rank,
              "ftk_s": round(t_f, 4), "numpy_s": round(t_svd, 4), "ratio": round(t_svd / t_f, 2),
              "projector_max_diff": dist_svd})
        emit({"kind": "bench", "what": "subspace_vs_numpy_gram_eigh", "n": a.n, "d": a.d, "rank": a.rank,
              "ftk_s": round(t_f, 4), "numpy_s": round(t_eig, 4), "ratio": round(t_eig / t_f, 2),
              "projector_max_diff": dist_eig})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
