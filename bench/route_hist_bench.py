#!/usr/bin/env python3
"""Benchmark route-hist against numpy on large MoE routing traces.

Prints one JSON line per measurement (see bench/README.md). Generated
traces live in bench/out/ (gitignored) and are reused when present and
complete. Python 3.11, stdlib + numpy + safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
GEN_VERSION = "1"  # bump when the generators change, to force regeneration
TENSOR = "layer.0.topk"
MIB = 1 << 20
GIB = 1 << 30


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------

def zipf_table(experts: int, s: float, rng: np.random.Generator, size: int = 1 << 16) -> np.ndarray:
    """A lookup table whose uniform sampling gives zipf(s)-skewed expert ids.

    Rank r gets weight 1/(r+1)^s; ranks are mapped to a random permutation
    of expert ids so the hot experts are not simply 0, 1, 2...
    """
    w = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** s
    n = np.floor(w / w.sum() * size).astype(np.int64)
    n[0] += size - n.sum()  # remainder to the hottest expert
    perm = rng.permutation(experts)
    return np.repeat(perm, n).astype(np.int64)


def st_header(dtype: str, shape: list[int], nbytes: int, meta: dict[str, str]) -> bytes:
    h = {"__metadata__": meta, TENSOR: {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def read_st_header(path: Path) -> tuple[int, dict]:
    """(data offset, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def st_is_complete(path: Path, header: bytes, nbytes: int) -> bool:
    if not path.exists() or path.stat().st_size != len(header) + nbytes:
        return False
    with open(path, "rb") as f:
        return f.read(len(header)) == header


def gen_topk(out: Path, gib: float, k: int, experts: int, zipf: float, seed: int) -> list[tuple[str, Path, int]]:
    """int64 and int32 [T, k] top-k traces from the same ids; T sized so the
    int64 file is ~gib GiB. Returns [(dtype, path, tokens)]."""
    tokens = max(1, int(gib * GIB) // (k * 8))
    meta = {"gen": f"route_hist_bench v{GEN_VERSION}", "seed": str(seed), "zipf": str(zipf), "step": "0"}
    files = []
    todo = []
    for dt, np_dt, w in (("I64", np.int64, 8), ("I32", np.int32, 4)):
        path = out / f"topk_{dt.lower()}_{gib:g}gib.safetensors"
        nbytes = tokens * k * w
        header = st_header(dt, [tokens, k], nbytes, meta)
        files.append((dt.lower(), path, tokens))
        if not st_is_complete(path, header, nbytes):
            todo.append((path, header, np_dt))
    if not todo:
        return files
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    table = zipf_table(experts, zipf, rng)
    handles = []
    for path, header, np_dt in todo:
        tmp = path.with_suffix(".tmp")
        f = open(tmp, "wb")
        f.write(header)
        handles.append((f, tmp, path, np_dt))
    chunk = 1 << 20  # tokens per chunk: 64 MiB of int64 ids
    for a in range(0, tokens, chunk):
        n = min(chunk, tokens - a)
        ids = table[rng.integers(0, table.size, size=n * k)]
        for f, _, _, np_dt in handles:
            f.write(ids.astype(np_dt, copy=False).tobytes())
    for f, tmp, path, _ in handles:
        f.close()
        os.replace(tmp, path)
    log(f"generated {', '.join(p.name for _, _, p, _ in handles)} in {time.perf_counter() - t0:.1f}s")
    return files


def gen_jsonl(out: Path, sizes_gib: list[float], experts: int, k: int, ranks: int, layers: int,
              tokens_per_rec: int, zipf: float, seed: int) -> list[tuple[Path, dict]]:
    """JSON-lines route traces of ~sizes_gib GiB, written in one pass (the
    smaller ones are prefixes of the larger ones, cut at a step boundary).
    Each has a sidecar .expect.json with per-layer expected counts; its
    presence marks the trace complete. Returns [(path, expect)]."""
    paths = [out / f"route_{s:g}gib.jsonl" for s in sizes_gib]
    sides = [p.with_suffix(".expect.json") for p in paths]
    params = dict(gen=GEN_VERSION, experts=experts, k=k, ranks=ranks, layers=layers,
                  tokens_per_rec=tokens_per_rec, zipf=zipf, seed=seed)
    done = []
    for p, s, gib in zip(paths, sides, sizes_gib):
        if p.exists() and s.exists():
            e = json.loads(s.read_text())
            if e.get("params") == params and e.get("target_gib") == gib and p.stat().st_size == e["bytes"]:
                done.append((p, e))
    if len(done) == len(paths):
        return done
    assert k == 2, "the JSONL generator renders pairs"
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    table = zipf_table(experts, zipf, rng)
    # Every (a, b) pair rendered once as fixed-width "[a,b]," padded with
    # spaces (valid JSON whitespace), so a record body is one fancy index.
    width = len(f"[{experts - 1},{experts - 1}],")
    pairtab = np.array([f"[{a},{b}],".ljust(width).encode() for a in range(experts) for b in range(experts)],
                       dtype=f"S{width}")
    order = sorted(range(len(paths)), key=lambda i: sizes_gib[i])
    targets = [int(sizes_gib[i] * GIB) for i in order]
    fhs = [open(paths[i].with_suffix(".tmp"), "wb") for i in order]
    open_from = 0  # files order[open_from:] still being written
    counts = np.zeros((layers, experts), dtype=np.int64)
    written = 0
    recs = 0
    step = 0
    results: dict[int, dict] = {}
    per_step = layers * ranks
    while open_from < len(fhs):
        a = table[rng.integers(0, table.size, size=per_step * tokens_per_rec)]
        b = table[rng.integers(0, table.size, size=per_step * tokens_per_rec)]
        clash = a == b  # a token's k experts are distinct
        b[clash] = (b[clash] + 1 + rng.integers(0, experts - 1, size=int(clash.sum()))) % experts
        codes = (a * experts + b).reshape(layers, ranks, tokens_per_rec)
        counts += np.apply_along_axis(np.bincount, 1, np.concatenate(
            [a.reshape(layers, -1), b.reshape(layers, -1)], axis=1), minlength=experts)
        bodies = pairtab[codes]
        buf = bytearray()
        for layer in range(layers):
            for r in range(ranks):
                body = bodies[layer, r].tobytes().rstrip(b", ")
                buf += b'{"kind":"route","layer":%d,"step":%d,"rank":%d,"topk":[%s]}\n' % (layer, step, r, body)
        for f in fhs[open_from:]:
            f.write(buf)
        written += len(buf)
        recs += per_step
        step += 1
        while open_from < len(fhs) and written >= targets[open_from]:
            i = order[open_from]
            fhs[open_from].close()
            os.replace(paths[i].with_suffix(".tmp"), paths[i])
            e = dict(params=params, target_gib=sizes_gib[i], bytes=written, records=recs, steps=step,
                     tokens=recs * tokens_per_rec, counts=counts.tolist())
            sides[i].write_text(json.dumps(e))
            results[i] = e
            open_from += 1
    log(f"generated {', '.join(p.name for p in paths)} in {time.perf_counter() - t0:.1f}s")
    return [(paths[i], results[i]) for i in range(len(paths))]


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warm(path: Path) -> None:
    """Read the file once so every timed run sees it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 * MIB)
        while f.readinto(buf):
            pass


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


class AnonSampler(threading.Thread):
    """Polls /proc/PID/status of route-hist for the largest RssAnon seen.
    Sampled, so a lower bound on the anonymous (heap/stack) peak; it separates
    allocations from mapped file pages, which max RSS lumps together. With
    /usr/bin/time in between, PID is time's and route-hist is its child."""

    def __init__(self, pid: int, via_time: bool):
        super().__init__(daemon=True)
        self.pid, self.via_time, self.peak_kib, self.stop = pid, via_time, 0, threading.Event()

    def run(self) -> None:
        pid = None if self.via_time else self.pid
        while not self.stop.is_set():
            try:
                if pid is None:
                    kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
                    if not kids:
                        time.sleep(0.0005)
                        continue
                    pid = int(kids[0])
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                            break
            except (OSError, ValueError):
                return
            time.sleep(0.002)


def run_ftk(argv: list[str], stdin_path: Path | None = None, sample_anon: bool = False,
            rss: bool = False) -> tuple[float, bytes, float, float]:
    """Run route-hist; returns (wall seconds, stdout, max RSS MiB, sampled
    peak RssAnon MiB). With stdin_path the input is piped from `cat FILE`
    and the wall time covers the whole pipeline. With rss, route-hist runs
    under `/usr/bin/time -v` (not for timed runs), whose "Maximum resident
    set size" is route-hist's own peak; without /usr/bin/time, falls back to
    wait4's ru_maxrss, which on Linux can include the forking Python
    process's RSS carried over exec (an overestimate)."""
    use_time = rss and TIME is not None
    if use_time:
        argv = [TIME, "-v"] + argv
    t0 = time.perf_counter()
    cat = None
    err = subprocess.PIPE if use_time else None
    if stdin_path is not None:
        cat = subprocess.Popen(["cat", str(stdin_path)], stdout=subprocess.PIPE)
        p = subprocess.Popen(argv, stdin=cat.stdout, stdout=subprocess.PIPE, stderr=err)
        cat.stdout.close()
    else:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
    sampler = AnonSampler(p.pid, use_time) if sample_anon else None
    if sampler:
        sampler.start()
    if use_time:
        out, errb = p.communicate()
    else:
        out, errb = p.stdout.read(), b""
        p.stdout.close()
    _, status, ru = os.wait4(p.pid, 0) if p.returncode is None else (0, 0, None)
    if ru is not None:
        p.returncode = os.waitstatus_to_exitcode(status)
    if cat is not None:
        cat.wait()
    dt = time.perf_counter() - t0
    if sampler:
        sampler.stop.set()
        sampler.join()
    if p.returncode != 0 or (cat is not None and cat.returncode != 0):
        sys.stderr.write(errb.decode(errors="replace"))
        raise SystemExit(f"FAIL: {' '.join(argv)} exited {p.returncode}")
    max_rss = float("nan")
    if use_time:
        for line in errb.decode().splitlines():
            if "Maximum resident set size" in line:
                max_rss = int(line.rsplit(":", 1)[1]) / 1024
    elif ru is not None:
        max_rss = ru.ru_maxrss / 1024
    return dt, out, max_rss, (sampler.peak_kib / 1024 if sampler else float("nan"))


def numpy_safetensors(path: Path, experts: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    with safe_open(str(path), framework="np") as f:
        t = f.get_tensor(TENSOR)
    c = np.bincount(t.ravel(), minlength=experts)
    dt = time.perf_counter() - t0
    del t
    return dt, c


NP_DTYPES = {"I64": np.int64, "I32": np.int32}


def numpy_memmap(path: Path, experts: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    off, h = read_st_header(path)
    info = h[TENSOR]
    a, _ = info["data_offsets"]
    m = np.memmap(path, dtype=NP_DTYPES[info["dtype"]], mode="r", offset=off + a, shape=tuple(info["shape"]))
    c = np.bincount(m.ravel(), minlength=experts)
    dt = time.perf_counter() - t0
    del m
    return dt, c


def check(name: str, got, want) -> None:
    got, want = np.asarray(got, dtype=np.int64), np.asarray(want, dtype=np.int64)
    if got.shape != want.shape or not np.array_equal(got, want):
        bad = np.flatnonzero(got != want)[:5] if got.shape == want.shape else "shape"
        raise SystemExit(f"FAIL: {name}: route-hist counts differ from numpy (first differing experts: {bad})")


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="size of the int64 safetensors trace (default 1)")
    ap.add_argument("--jsonl-gib", default="0.25,1", help="JSON-lines trace sizes, comma-separated (default 0.25,1)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per case; the median is reported")
    ap.add_argument("--jsonl-reps", type=int, default=3, help="timed repetitions per JSON-lines size")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.0, help="expert-popularity skew exponent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--ftk", type=Path, default=ROOT / "target" / "release" / "route-hist")
    ap.add_argument("--skip-jsonl", action="store_true")
    args = ap.parse_args()

    if not args.ftk.exists():
        raise SystemExit(f"{args.ftk} not found; run: cargo build --release -p route-hist")
    args.out.mkdir(parents=True, exist_ok=True)
    ftk = str(args.ftk)
    threads = os.cpu_count()

    # ---- safetensors top-k: ftk vs numpy ---------------------------------
    for dtype, path, tokens in gen_topk(args.out, args.gib, args.k, args.experts, args.zipf, args.seed):
        warm(path)
        off, _ = read_st_header(path)
        nbytes = path.stat().st_size - off
        argv = [ftk, "--experts", str(args.experts), str(path)]
        times = {"ftk": [], "numpy-safetensors": [], "numpy-memmap": []}
        ref = None
        for rep in range(args.reps):
            # Interleaved so all three see the same machine conditions.
            dt, out, _, _ = run_ftk(argv)
            times["ftk"].append(dt)
            rec = json.loads(out.splitlines()[0])
            for peer, fn in (("numpy-safetensors", numpy_safetensors), ("numpy-memmap", numpy_memmap)):
                dt, c = fn(path, args.experts)
                times[peer].append(dt)
                check(f"{path.name} vs {peer}", rec["counts"], c)
                if ref is None:
                    ref = c
                    if rec["tokens"] != tokens or int(c.sum()) != tokens * args.k:
                        raise SystemExit(f"FAIL: {path.name}: token count {rec['tokens']} != {tokens}")
        # Memory, in a separate untimed run (the sampler thread costs a little).
        _, _, rss, anon = run_ftk(argv, sample_anon=True, rss=True)
        ftk_s = statistics.median(times["ftk"])
        for peer in ("numpy-safetensors", "numpy-memmap"):
            peer_s = statistics.median(times[peer])
            emit({"bench": "route_hist_topk_count", "dtype": dtype, "tokens": tokens, "k": args.k,
                  "experts": args.experts, "bytes": nbytes, "ftk_s": round(ftk_s, 4), "peer": peer,
                  "peer_s": round(peer_s, 4), "speedup": round(peer_s / ftk_s, 2),
                  "ftk_gb_s": round(nbytes / ftk_s / 1e9, 2), "peer_gb_s": round(nbytes / peer_s / 1e9, 2),
                  "ftk_max_rss_mib": round(rss, 1), "ftk_rss_anon_mib": round(anon, 1),
                  "reps": args.reps, "threads": threads})

    # ---- JSON lines through stdin: throughput and constant memory --------
    if args.skip_jsonl:
        return
    sizes = [float(s) for s in args.jsonl_gib.split(",") if s]
    je, jk, jranks, jlayers = 64, 2, 4, 8
    for path, exp in gen_jsonl(args.out, sizes, je, jk, jranks, jlayers, 1024, args.zipf, args.seed):
        warm(path)
        argv = [ftk, "--experts", str(je), "--ep", str(jranks)]
        times = []
        for rep in range(args.jsonl_reps):
            dt, out, _, _ = run_ftk(argv, stdin_path=path)
            times.append(dt)
        # One untimed run for memory, whose output is also checked.
        _, out, rss, anon = run_ftk(argv, stdin_path=path, sample_anon=True, rss=True)
        got = np.zeros((jlayers, je), dtype=np.int64)
        lines = 0
        for line in out.splitlines():
            r = json.loads(line)
            got[r["layer"]] += r["counts"]
            lines += 1
        check(f"{path.name} (summed per layer)", got, exp["counts"])
        if lines != jlayers * exp["steps"]:
            raise SystemExit(f"FAIL: {path.name}: {lines} output lines, expected {jlayers * exp['steps']}")
        ftk_s = statistics.median(times)
        emit({"bench": "route_hist_jsonl_stdin", "bytes": exp["bytes"], "records": exp["records"],
              "steps": exp["steps"], "layers": jlayers, "tokens": exp["tokens"], "k": jk, "experts": je,
              "ep": jranks, "ftk_s": round(ftk_s, 3), "ftk_mb_s": round(exp["bytes"] / ftk_s / 1e6, 1),
              "ftk_max_rss_mib": round(rss, 1), "ftk_rss_anon_mib": round(anon, 1),
              "reps": args.jsonl_reps, "threads": threads})


if __name__ == "__main__":
    main()
