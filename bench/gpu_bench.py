"""GPU benchmarks (issue 9), one JSON line per measurement; prints a skip line
and exits 0 where no CUDA device is visible to PyTorch.

1. chunk-run --device cuda against PyTorch eager on the same GPU: transformers'
   MixtralSparseMoeBlock stacked with residuals, forward + backward of
   loss = sum(y * dy), f32 (no TF32 on either side) and bf16; tokens/s (best of
   --steps after a warm-up step) and peak activation memory (ftk: its counted
   device buffers; PyTorch: max_memory_allocated minus what was allocated
   before the step). Routing from random router weights on both sides.
2. fed-aggregate --device cuda: FedAvg of --clients f32 clients of --client-mib
   each (files in the page cache), GB/s of client bytes read, against the
   device's pinned host-to-device copy bandwidth measured with PyTorch in the
   same run, and against fed-aggregate --device cpu.

Run: .venv/bin/python bench/gpu_bench.py  (make bench runs it)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SHAPE = dict(hidden=2048, ffn=5632, experts=8, topk=2, tokens=16384, layers=2)


def ftk_chunk_run(binary, dtype, modes, steps, shape):
    args = [binary, "--device", "cuda", "--dtype", dtype, "--hidden", str(shape["hidden"]),
            "--ffn", str(shape["ffn"]), "--experts", str(shape["experts"]),
            "--topk", str(shape["topk"]), "--tokens", str(shape["tokens"]),
            "--layers", str(shape["layers"]), "--recompute", ",".join(modes),
            "--steps", str(steps + 1)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    recs = [json.loads(l) for l in out.splitlines()]
    res = {}
    for m in modes:
        name = m.split(":")[0]
        rs = [r for r in recs if r["recompute"] == name][1:]  # drop the warm-up step
        res[m] = dict(tokens_per_s=max(r["tokens_per_s"] for r in rs),
                      peak_act_bytes=max(r["peak_act_bytes"] for r in rs),
                      predicted_act_bytes=rs[0]["predicted_act_bytes"],
                      device_reserved_bytes=rs[-1].get("device_reserved_bytes"))
    return res


def torch_moe(dtype, steps, shape, recompute):
    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    cfg = MixtralConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                        num_local_experts=shape["experts"], num_experts_per_tok=shape["topk"],
                        router_jitter_noise=0.0)
    blocks = []
    for _ in range(shape["layers"]):
        b = MixtralSparseMoeBlock(cfg).to("cuda", dt)
        with torch.no_grad():
            for p in b.parameters():
                p.normal_(0, 0.02)
        blocks.append(b)
    x = torch.randn(1, shape["tokens"], shape["hidden"], device="cuda", dtype=dt)
    dy = torch.randn_like(x)
    best, peak = float("inf"), 0
    for i in range(steps + 1):
        for b in blocks:
            b.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        xr = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        y = xr
        for b in blocks:
            y = y + (checkpoint(b, y, use_reentrant=False) if recompute == "full" else b(y))
        (y.float() * dy.float()).sum().backward()
        torch.cuda.synchronize()
        dt_s = time.perf_counter() - t0
        if i > 0:
            best = min(best, dt_s)
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
    del blocks, x, dy
    torch.cuda.empty_cache()
    return dict(tokens_per_s=shape["tokens"] / best, peak_act_bytes=peak)


def h2d_bandwidth():
    import torch
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * n / (time.perf_counter() - t0) / 1e9


def fed_aggregate(binary, clients, client_mib, workdir):
    import numpy as np
    from safetensors.numpy import save_file
    n = client_mib * (1 << 20) // 4
    rng = np.random.default_rng(0)
    lines = []
    for c in range(clients):
        p = os.path.join(workdir, f"c{c}.safetensors")
        save_file({"w": rng.standard_normal(n, dtype=np.float32)}, p)
        lines.append(json.dumps({"kind": "client_update", "cid": f"c{c}", "path": p,
                                 "num_examples": 100 + c}))
    m = os.path.join(workdir, "m.jsonl")
    with open(m, "w") as f:
        f.write("\n".join(lines) + "\n")
    res = {}
    outs = {}
    for dev in ["cuda", "cpu", "cuda"]:
        o = os.path.join(workdir, f"out_{dev}.safetensors")
        t0 = time.perf_counter()
        r = subprocess.run([binary, "--strategy", "fedavg", "--device", dev, "-o", o, m],
                           check=True, capture_output=True, text=True,
                           env={**os.environ, "FTK_NO_PROGRESS": "1", "FTK_CUDA_TRACE": "1"})
        gbs = clients * n * 4 / (time.perf_counter() - t0) / 1e9
        if dev == "cuda" and dev not in res:
            print(r.stderr[-2000:], file=sys.stderr)
        res[dev] = max(res.get(dev, 0), gbs)
        outs[dev] = open(o, "rb").read()
    return res, outs["cuda"] == outs["cpu"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-run", default="target/release/chunk-run")
    ap.add_argument("--fed-aggregate", default="target/release/fed-aggregate")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--client-mib", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: moe,fedagg")
    a = ap.parse_args()
    try:
        import torch
        ok = torch.cuda.is_available()
    except ImportError:
        ok = False
    if not ok:
        print(json.dumps({"bench": "gpu", "skipped": "no CUDA device visible to PyTorch"}))
        return
    gpu = torch.cuda.get_device_name(0)
    skip = set(a.skip.split(","))
    if "moe" not in skip:
        for dtype in ["bf16", "f32"]:
            ours = ftk_chunk_run(a.chunk_run, dtype, ["none", "full", "chunked:4"], a.steps, SHAPE)
            for mode in ["none", "full"]:
                theirs = torch_moe(dtype, a.steps, SHAPE, mode)
                o = ours[mode]
                print(json.dumps({
                    "bench": "chunk_run_cuda_vs_torch", "gpu": gpu, "dtype": dtype, "mode": mode,
                    **SHAPE, "ftk_tokens_per_s": round(o["tokens_per_s"], 1),
                    "torch_tokens_per_s": round(theirs["tokens_per_s"], 1),
                    "speedup": round(o["tokens_per_s"] / theirs["tokens_per_s"], 3),
                    "ftk_peak_act_bytes": o["peak_act_bytes"],
                    "ftk_predicted_act_bytes": o["predicted_act_bytes"],
                    "torch_peak_act_bytes": theirs["peak_act_bytes"],
                    "mem_ratio": round(o["peak_act_bytes"] / theirs["peak_act_bytes"], 3),
                }), flush=True)
            c = ours["chunked:4"]
            print(json.dumps({
                "bench": "chunk_run_cuda_chunked", "gpu": gpu, "dtype": dtype, "mode": "chunked:4",
                "tokens_per_s": round(c["tokens_per_s"], 1),
                "tput_vs_full": round(c["tokens_per_s"] / ours["full"]["tokens_per_s"], 3),
                "tput_vs_none": round(c["tokens_per_s"] / ours["none"]["tokens_per_s"], 3),
                "peak_act_bytes": c["peak_act_bytes"], "predicted_act_bytes": c["predicted_act_bytes"],
                "act_vs_none": round(c["peak_act_bytes"] / ours["none"]["peak_act_bytes"], 3),
            }), flush=True)
    if "fedagg" not in skip:
        bw = h2d_bandwidth()
        with tempfile.TemporaryDirectory(dir=a.workdir) as d:
            res, same = fed_aggregate(a.fed_aggregate, a.clients, a.client_mib, d)
        print(json.dumps({
            "bench": "fed_aggregate_cuda", "gpu": gpu, "clients": a.clients,
            "client_mib": a.client_mib, "cuda_gb_per_s": round(res["cuda"], 2),
            "cpu_gb_per_s": round(res["cpu"], 2), "pinned_h2d_gb_per_s": round(bw, 2),
            "vs_h2d": round(res["cuda"] / bw, 3), "vs_cpu": round(res["cuda"] / res["cpu"], 3),
            "same_bytes_as_cpu": same, "cpu_threads": os.cpu_count(),
        }), flush=True)


if __name__ == "__main__":
    main()
