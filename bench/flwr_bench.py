#!/usr/bin/env python3
"""Benchmark a Flower ServerApp's aggregate step: native FedAvg vs ftk.flwr.

Each measurement runs in a fresh Python process that plays the ServerApp: it
builds N reply Messages (ArrayRecords of f32 tensors, as Flower hands them to
`aggregate_train`) and then times one `strategy.aggregate_train(1, replies)`:

* native: flwr.serverapp.strategy.FedAvg (numpy, float32 accumulation);
* ftk:    FtkStrategy(FedAvg(...)): every reply written once as a safetensors
          client file (straight from the message bytes), fed-aggregate run,
          the result read back into an ArrayRecord.

Reported per process: the aggregate step's wall time, the server process's
peak RSS (ru_maxrss) and its RSS before the step (the replies alone), and for
ftk the peak RSS of fed-aggregate (RUSAGE_CHILDREN) and the hand-off split
(writing client files vs the fed-aggregate run; /usr/bin/time measures the
binary). One JSON line per case with
ratio = native_s / ftk_s; models compared (max |diff| / scale).

The client files go to --work (default bench/out/flwr, on disk; a comma list
runs every case in each) or, with --scratch, only they go there (FtkStrategy's
scratch_dir); every work file is removed after each case.

    cargo build --release -p fed-aggregate
    .venv/bin/python bench/flwr_bench.py                      # 50 x 50 MiB (FedAvg, Krum), then 2000 x 64 KiB
    .venv/bin/python bench/flwr_bench.py --cases big,small --work bench/out/flwr,/dev/shm/ftk-flwr
    .venv/bin/python bench/flwr_bench.py --cases big --scratch /dev/shm/ftk-flwr
    .venv/bin/python bench/flwr_bench.py --cases big --mib 100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
OUT = ROOT / "bench" / "out" / "flwr"
MIB = 1 << 20


def rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fs_type(path: str) -> str:
    """The filesystem type holding `path` (tmpfs, ext4, ...), from /proc/mounts."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind


def worker(args) -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg, FedMedian, Krum

    from flwr.supercore.task_identity import TaskIdentity

    from ftk.flwr import FtkStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what the ServerApp runtime sets

    n, per = args.clients, int(args.mib * MIB) // 4
    tensors = max(1, min(args.tensors, per // 1000))
    size = per // tensors
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(size, dtype=np.float32) for _ in range(tensors)]
    replies = []
    for i in range(n):
        ins = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=1000 + i, message_type=MessageType.TRAIN)
        rec = ArrayRecord({f"layers.{t}.weight": Array(base[t] + np.float32(0.01 * i)) for t in range(tensors)})
        replies.append(Message(content=RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 10 + i})}), reply_to=ins))
    del base
    global0 = ArrayRecord({f"layers.{t}.weight": Array(np.zeros(size, np.float32)) for t in range(tensors)})
    kind = {"fedavg": FedAvg, "krum": Krum, "fedmedian": FedMedian}[args.strategy]
    strat = kind(min_available_nodes=n, min_train_nodes=n)
    work = Path(args.work or OUT) / f"work-{args.variant}-{n}"
    shutil.rmtree(work, ignore_errors=True)
    rss_file = OUT / f"fed-aggregate-rss-{n}.txt"
    if args.variant == "ftk":
        # ru_maxrss of children would count the forked Python before exec: measure
        # fed-aggregate itself with /usr/bin/time (max RSS in KiB).
        wrapper = OUT / "fed-aggregate-timed"
        wrapper.write_text(
            f'#!/bin/sh\nexec /usr/bin/time -f %M -o "$FTK_BENCH_RSS" {ROOT / "target" / "release" / "fed-aggregate"} "$@"\n'
        )
        wrapper.chmod(0o755)
        os.environ["FTK_BENCH_RSS"] = str(rss_file)
        strat = FtkStrategy(strat, work_dir=work, fed_aggregate=str(wrapper), scratch_dir=args.scratch)
        # What configure_train does first: the current global to the work dir.
        strat._sent = global0
        strat._global = work / "global-r0.safetensors"
    rss_before = rss_now_mib()
    import ftk.flwr as ff

    spans: dict[str, list] = {"write": [], "run": [], "read": []}

    def timed(name, fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans[name].append((t, time.perf_counter()))

        return wrapped

    ff.write_arrayrecord = timed("write", ff.write_arrayrecord)
    ff._run = timed("run", ff._run)
    ff.read_arrayrecord = timed("read", ff.read_arrayrecord)
    try:
        t0 = time.perf_counter()
        arrays, _ = strat.aggregate_train(1, replies)
        dt = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "variant": args.variant,
        "s": dt,
        "rss_before_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.variant == "ftk":
        # wall time of each part: the (threaded) client-file writes, the
        # fed-aggregate process, reading its output back into an ArrayRecord
        for name, sp in spans.items():
            out[f"{name}_s"] = max(b for _, b in sp) - min(a for a, _ in sp)
        out["fed_aggregate_ms"] = strat.last_summary["ms"]
        out["child_peak_rss_mib"] = int(rss_file.read_text().split()[-1]) / 1024
    np.save(OUT / f"result-{args.variant}-{n}.npy", arrays["layers.0.weight"].numpy())
    print(json.dumps(out))


def run_case(name: str, clients: int, mib: float, tensors: int, work: str | None, strategy: str = "fedavg", scratch: str | None = None) -> dict:
    import numpy as np

    res = {}
    for variant in ("native", "ftk"):
        cmd = [sys.executable, __file__, "--worker", variant, "--clients", str(clients), "--mib", str(mib), "--tensors", str(tensors)]
        cmd += ["--strategy", strategy]
        if work:
            cmd += ["--work", work]
        if scratch:
            cmd += ["--scratch", scratch]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"flwr_bench: error: {variant} worker failed: {p.stderr.strip()[-2000:]}")
        res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    a = np.load(OUT / f"result-native-{clients}.npy")
    b = np.load(OUT / f"result-ftk-{clients}.npy")
    diff = float(np.abs(a.astype(np.float64) - b).max() / (np.abs(a).max() or 1.0))
    nat, ftk = res["native"], res["ftk"]
    line = {
        "kind": "flwr_bench",
        "case": name,
        "strategy": strategy,
        "clients": clients,
        "mib_per_client": mib,
        "tensors": tensors,
        "native_s": round(nat["s"], 3),
        "ftk_s": round(ftk["s"], 3),
        "ratio": round(nat["s"] / ftk["s"], 3),
        "ftk_write_s": round(ftk["write_s"], 3),
        "ftk_run_s": round(ftk["run_s"], 3),
        "ftk_read_s": round(ftk["read_s"], 3),
        "ftk_fed_aggregate_s": ftk["fed_aggregate_ms"] / 1000,
        "native_peak_rss_mib": round(nat["peak_rss_mib"]),
        "ftk_peak_rss_mib": round(ftk["peak_rss_mib"]),
        "replies_rss_mib": round(nat["rss_before_mib"]),
        "native_step_extra_rss_mib": round(nat["peak_rss_mib"] - nat["rss_before_mib"]),
        "ftk_step_extra_rss_mib": round(ftk["peak_rss_mib"] - ftk["rss_before_mib"]),
        "fed_aggregate_peak_rss_mib": round(ftk["child_peak_rss_mib"]),
        "max_diff_over_scale": diff,
        "threads": os.cpu_count(),
    }
    for f in OUT.glob(f"result-*-{clients}.npy"):
        f.unlink()
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["native", "ftk"], dest="variant")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--mib", type=float, default=50)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--small-clients", type=int, default=2000)
    ap.add_argument("--small-kib", type=float, default=64)
    ap.add_argument("--cases", default="big,big-krum,small", help="big (FedAvg), big-krum (Krum: Flower stacks every client), small")
    ap.add_argument("--strategy", default="fedavg", help=argparse.SUPPRESS)
    ap.add_argument(
        "--work",
        help="where FtkStrategy writes client files (default bench/out/flwr, on disk); "
        "a comma-separated list runs every case in each, e.g. bench/out/flwr,/dev/shm/ftk-flwr",
    )
    ap.add_argument("--scratch", help="FtkStrategy(scratch_dir=...): client files there, work dir for the model (e.g. /dev/shm/ftk-flwr)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.variant:
        worker(args)
        return
    if not (ROOT / "target" / "release" / "fed-aggregate").exists():
        sys.exit("flwr_bench: error: target/release/fed-aggregate missing; run `cargo build --release -p fed-aggregate`")
    works = (args.work or str(OUT)).split(",")
    for case in args.cases.split(","):
        for work in works:
            Path(work).mkdir(parents=True, exist_ok=True)
            if case == "big":
                line = run_case("big", args.clients, args.mib, args.tensors, work, scratch=args.scratch)
            elif case == "big-krum":
                line = run_case("big-krum", args.clients, args.mib, args.tensors, work, "krum", args.scratch)
            else:
                line = run_case("small", args.small_clients, args.small_kib / 1024, 4, work, scratch=args.scratch)
            line["work_dir"] = work
            line["client_files_fs"] = fs_type(args.scratch or work)
            if args.scratch:
                line["scratch_dir"] = args.scratch
            print(json.dumps(line), flush=True)
            if line["max_diff_over_scale"] > 1e-5:
                sys.exit(1)
    for d in [*works, args.scratch]:
        # leave no empty scratch dirs behind (the client files are already gone)
        if d and d != str(OUT):
            try:
                os.rmdir(d)
            except OSError:
                pass


if __name__ == "__main__":
    main()
