#!/usr/bin/env python3
"""mofa-predict benchmark: validation MAPE on published measurements and
tune throughput. Prints one JSON line per measurement. Stdlib only."""
import json, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "mofa-predict"
out = subprocess.run([str(BIN), "calibrate", str(ROOT / "testdata/mofa-predict/measurements.jsonl")],
                     capture_output=True, text=True, check=True).stdout.splitlines()
s = json.loads(out[-1])
print(json.dumps({"kind": "mofa_accuracy", "metric": "tflops_per_gpu", "mape_valid": s["mape_valid"],
                  "n_valid": s["n_valid"], "mape_calib": s["mape_calib"], "n_calib": s["n_calib"],
                  "baseline_constant_mfu_mape_valid": s["baseline_constant_mfu_mape_valid"],
                  "valid_by_source": {k: v["mape"] for k, v in s["valid_by_source"].items()}}))
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
