#!/usr/bin/env python3
"""Benchmark fed-aggregate (fedavg) against Flower's numpy `aggregate`.

N clients x P float32 parameters (default 50 x 25.05M = 100 MB each, in 200
tensors). Both sides read the same safetensors files from a warm page cache:

* ftk:    `target/release/fed-aggregate --strategy fedavg -o OUT MANIFEST`,
          whole-process wall time (start-up, mmap reads, f64 accumulation,
          writing and fsyncing the 100 MB output).
* Flower: `safetensors.numpy.load_file` for every client, then
          `flwr.server.strategy.aggregate.aggregate(results)`, timed in-process
          from the first load to the returned list (interpreter start-up,
          imports and writing a result are excluded, which favours Flower).

Peak RSS of each process comes from `/usr/bin/time -v` in separate, untimed
runs. ftk is also run on the first 10 clients to show its peak RSS does not
grow with the number of clients. Outputs are compared (ftk accumulates in
f64, Flower in f32). One JSON line per measurement; exit 1 on a mismatch.

    cargo build --release -p fed-aggregate
    .venv/bin/python bench/fed_aggregate_bench.py [--clients 50] [--params 25050000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "fed-aggregate"
TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None
MIB = 1 << 20


def layout(params: int, tensors: int) -> list[tuple[str, list[int]]]:
    """Half weight matrices [r, c], half biases [c], summing to ~params."""
    pairs = tensors // 2
    c = 500
    r = max(1, (params // pairs - c) // c)
    out = []
    for i in range(pairs):
        out.append((f"layers.{i:03d}.weight", [r, c]))
        out.append((f"layers.{i:03d}.bias", [c]))
    return out


def header(shapes: list[tuple[str, list[int]]]) -> tuple[bytes, int]:
    h, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 4
        h[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    b = json.dumps(h, separators=(",", ":")).encode()
    b += b" " * (-len(b) % 8)
    return struct.pack("<Q", len(b)) + b, off


def generate(d: Path, n: int, params: int, tensors: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    shapes = layout(params, tensors)
    hdr, nbytes = header(shapes)
    manifest = d / f"clients_{n}.jsonl"
    tag = d / f"complete_{n}_{nbytes}"
    if not tag.exists():
        for i in range(n):
            p = d / f"c{i:03d}.safetensors"
            if p.exists() and p.stat().st_size == len(hdr) + nbytes:
                continue
            rng = np.random.default_rng(1000 + i)
            data = rng.standard_normal(nbytes // 4, dtype=np.float32) * 0.1 + np.float32(i % 7) * 0.01
            with open(p, "wb") as f:
                f.write(hdr)
                f.write(data.tobytes())
        with open(manifest, "w") as f:
            for i in range(n):
                f.write(json.dumps({"kind": "client_update", "cid": str(i), "path": f"c{i:03d}.safetensors",
                                    "num_examples": 100 + 37 * i}) + "\n")
        tag.touch()
    return manifest


def sub_manifest(manifest: Path, k: int) -> Path:
    p = manifest.with_name(f"first_{k}.jsonl")
    p.write_text("".join(manifest.read_text().splitlines(keepends=True)[:k]))
    return p


def warm(d: Path) -> None:
    for p in sorted(d.glob("c*.safetensors")):
        with open(p, "rb") as f:
            while f.read(64 * MIB):
                pass


def max_rss_mib(argv: list[str]) -> float:
    if TIME is None:
        return float("nan")
    r = subprocess.run([TIME, "-v"] + argv, capture_output=True, text=True, check=True)
    for line in r.stderr.splitlines():
        if "Maximum resident set size" in line:
            return int(line.split()[-1]) / 1024
    return float("nan")


def ftk_argv(manifest: Path, out: Path) -> list[str]:
    return [str(BIN), "--strategy", "fedavg", "-o", str(out), str(manifest)]


def flower_argv(manifest: Path, out: Path | None) -> list[str]:
    return [sys.executable, __file__, "--flower-worker", str(manifest)] + ([str(out)] if out else [])


def flower_worker(manifest: Path, out: str | None) -> None:
    from flwr.server.strategy.aggregate import aggregate
    from safetensors.numpy import load_file

    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    results = []
    names = None
    for r in rows:
        d = load_file(str(manifest.parent / r["path"]))
        names = names or sorted(d)
        results.append(([d[k] for k in names], r["num_examples"]))
    agg = aggregate(results)
    t1 = time.perf_counter()
    if out:
        from safetensors.numpy import save_file
        save_file(dict(zip(names, agg, strict=True)), out)
    print(json.dumps({"load_aggregate_s": t1 - t0}))


def compare(a: Path, b: Path) -> tuple[float, float]:
    from safetensors.numpy import load_file
    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y), "tensor names differ"
    worst_abs = worst_rel = 0.0
    for k in x:
        u, v = x[k].astype(np.float64), y[k].astype(np.float64)
        diff = np.abs(u - v)
        floor = max(np.mean(np.abs(v)), 1e-30)
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(v), floor)).max()))
    return worst_abs, worst_rel


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--params", type=int, default=25_050_000)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small", type=int, default=10, help="client count for the RSS-vs-clients check")
    ap.add_argument("--flower-worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.flower_worker:
        flower_worker(Path(a.flower_worker[0]), a.flower_worker[1] if len(a.flower_worker) > 1 else None)
        return 0
    if not BIN.exists():
        print(f"FAIL: {BIN} missing; run cargo build --release -p fed-aggregate", file=sys.stderr)
        return 1
    d = ROOT / "bench" / "out" / "fed"
    manifest = generate(d, a.clients, a.params, a.tensors)
    small = sub_manifest(manifest, min(a.small, a.clients))
    warm(d)
    out_ftk, out_fl = d / "out_ftk.safetensors", d / "out_flower.safetensors"
    # Correctness first (untimed): same files, both outputs.
    subprocess.run(ftk_argv(manifest, out_ftk), check=True, capture_output=True)
    subprocess.run(flower_argv(manifest, out_fl), check=True, capture_output=True)
    worst_abs, worst_rel = compare(out_ftk, out_fl)
    if worst_rel > 1e-5:
        print(f"FAIL: ftk and Flower differ: max rel {worst_rel:.3e}", file=sys.stderr)
        return 1
    ftk_t, fl_t = [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        subprocess.run(ftk_argv(manifest, out_ftk), check=True, capture_output=True)
        ftk_t.append(time.perf_counter() - t0)
        r = subprocess.run(flower_argv(manifest, None), check=True, capture_output=True, text=True)
        fl_t.append(json.loads(r.stdout.strip().splitlines()[-1])["load_aggregate_s"])
    ftk_rss = max_rss_mib(ftk_argv(manifest, out_ftk))
    ftk_rss_small = max_rss_mib(ftk_argv(small, out_ftk))
    fl_rss = max_rss_mib(flower_argv(manifest, None))
    shapes = layout(a.params, a.tensors)
    params = sum(int(np.prod(s)) for _, s in shapes)
    model_mib = params * 4 / MIB
    f, p = statistics.median(ftk_t), statistics.median(fl_t)
    print(json.dumps({
        "kind": "fed_aggregate_bench", "strategy": "fedavg", "clients": a.clients, "params": params,
        "tensors": len(shapes), "model_mib": round(model_mib, 1), "bytes_read": a.clients * params * 4,
        "ftk_s": round(f, 3), "flower_s": round(p, 3), "speedup": round(p / f, 2),
        "ftk_max_rss_mib": round(ftk_rss, 1), f"ftk_max_rss_mib_{min(a.small, a.clients)}_clients": round(ftk_rss_small, 1),
        "flower_max_rss_mib": round(fl_rss, 1), "ftk_rss_over_model": round(ftk_rss / model_mib, 2),
        "max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "threads": os.cpu_count(),
        "ftk_accumulator": "f64", "reps": a.reps,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
