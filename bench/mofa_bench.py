#!/usr/bin/env python3
"""mofa-predict benchmark: leave-one-source-out accuracy on the published
corpus (testdata/mofa-predict/measurements.jsonl and corpus/, compiled into
the binary) and tune throughput. Prints one JSON line per measurement.
Stdlib only."""
import json, subprocess, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "mofa-predict"
t0 = time.perf_counter()
out = subprocess.run([str(BIN), "calibrate"], capture_output=True, text=True, check=True).stdout.splitlines()
s = json.loads(out[-1])
print(json.dumps({
    "kind": "mofa_accuracy", "metric": "each row's published metric (iter_s, tokens/s, TFLOP/s, MFU)",
    "loso_mape_mean_over_sources": s["loso_mape_mean_over_sources"],
    "loso_mape_worst_source": s["loso_mape_worst_source"],
    "loso_by_source": {k: round(v["loso_mape"], 2) for k, v in s["loso_by_source"].items()},
    "insample_mape_mean_over_sources": s["insample_mape_mean_over_sources"],
    "baseline_constant_mfu_loso_mape": s["baseline_constant_mfu_loso_mape"],
    "n_rows": s["n_rows"], "n_sources": s["n_sources"],
    "ft_default_mtbf_mape": s["ft"]["mtbf_default_mape"],
    "calibrate_wall_s": time.perf_counter() - t0}))
for cfg, gpus, seq in [("testdata/configs/llama-3-8b/config.json", 1024, 8192),
                       ("testdata/configs/mixtral-8x7b/config.json", 1024, 4096)]:
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN), "tune", "--model", str(ROOT / cfg), "--seq", str(seq), "--cluster", "H100",
                        "--gpus", str(gpus), "--gbs", "1024", "--top", "1"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    summ = json.loads(r.stdout.splitlines()[-1])
    print(json.dumps({"kind": "mofa_tune_speed", "model": cfg.split("/")[-2], "gpus": gpus,
                      "candidates": summ["candidates"], "strategies_per_s": summ["strategies_per_s"],
                      "process_wall_s": wall}))
