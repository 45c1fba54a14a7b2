"""chunk-run benchmark (issue 4), one JSON line per measurement.

1. The MemFine sweep on a skewed routing (--synthetic hot:0.45: one expert gets 45% of
   the routed tokens), L=4, h=1024, f=2816, E=8, k=2, T=4096: none, full, chunked:1/2/4/8
   and auto (MACT, with a budget between the chunked:2 and full peaks), each against
   full recompute: activation memory ratio and throughput ratio, plus mem-plan's
   prediction of the same peak and its error.
2. Forward+backward time against PyTorch eager on the same shapes and thread count
   (transformers' MixtralSparseMoeBlock stacked with residuals; full recompute with
   torch.utils.checkpoint), routing from the (random) router weights on both sides.

Run: make bench  (or .venv/bin/python bench/chunk_run_bench.py [--steps N] [--threads N])
"""
import argparse
import json
import os
import subprocess
import time

SHAPE = dict(hidden=1024, ffn=2816, experts=8, topk=2, tokens=4096, layers=4)


def ftk(binary, mode, steps, threads, extra=()):
    args = [binary, "--hidden", str(SHAPE["hidden"]), "--ffn", str(SHAPE["ffn"]),
            "--experts", str(SHAPE["experts"]), "--topk", str(SHAPE["topk"]),
            "--tokens", str(SHAPE["tokens"]), "--layers", str(SHAPE["layers"]),
            "--recompute", mode, "--steps", str(steps), "--threads", str(threads), *extra]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    recs = [json.loads(l) for l in out.splitlines()]
    best = recs[-1]  # later steps reuse thread-local GEMM buffers
    best["tokens_per_s"] = max(r["tokens_per_s"] for r in recs[1:] or recs)
    return best


def torch_tokens_per_s(mode, steps, threads):
    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["ffn"],
                        num_local_experts=SHAPE["experts"], num_experts_per_tok=SHAPE["topk"],
                        router_jitter_noise=0.0)
    blocks = []
    for _ in range(SHAPE["layers"]):
        b = MixtralSparseMoeBlock(cfg).float()
        with torch.no_grad():
            b.gate.weight.normal_(0, 0.02)
            b.experts.gate_up_proj.normal_(0, 0.02)
            b.experts.down_proj.normal_(0, 0.02)
        blocks.append(b)
    x = torch.randn(1, SHAPE["tokens"], SHAPE["hidden"])
    dy = torch.randn(1, SHAPE["tokens"], SHAPE["hidden"])
    best = float("inf")
    for _ in range(steps):
        for b in blocks:
            b.zero_grad(set_to_none=False)
        xr = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        y = xr
        for b in blocks:
            if mode == "full":
                y = y + checkpoint(b, y, use_reentrant=False)
            else:
                y = y + b(y)
        (y * dy).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return SHAPE["tokens"] / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ftk", default="target/release/chunk-run")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; best tokens/s per mode")
    a = ap.parse_args()
    skew = ["--synthetic", "hot:0.45", "--seed", "1"]
    modes = ["full", "none", "chunked:1", "chunked:2", "chunked:4", "chunked:8"]
    runs = {m: ftk(a.ftk, m, a.steps, a.threads, skew) for m in modes}
    budget = (runs["chunked:2"]["peak_bytes"] + runs["full"]["peak_bytes"]) // 2
    auto = skew + ["--device-mem", str(budget), "--alpha", "1"]
    runs["auto"] = ftk(a.ftk, "auto", a.steps, a.threads, auto)
    # Throughput on a shared 2-core VM is noisy: alternate the modes for a few
    # more rounds and keep each mode's best, so every mode sees the same noise.
    for _ in range(a.rounds - 1):
        for m in modes + ["auto"]:
            r = ftk(a.ftk, m, a.steps, a.threads, auto if m == "auto" else skew)
            runs[m]["tokens_per_s"] = max(runs[m]["tokens_per_s"], r["tokens_per_s"])
    full = runs["full"]
    for m, r in runs.items():
        print(json.dumps({
            "bench": "chunk_run_modes", "mode": m, "chunks": r["chunks_per_layer"],
            "peak_act_bytes": r["peak_act_bytes"], "predicted_act_bytes": r["predicted_act_bytes"],
            "pred_err": round(r["predicted_act_bytes"] / r["peak_act_bytes"] - 1, 4),
            "act_vs_full": round(r["peak_act_bytes"] / full["peak_act_bytes"], 4),
            "tokens_per_s": round(r["tokens_per_s"], 1),
            "tput_vs_full": round(r["tokens_per_s"] / full["tokens_per_s"], 4),
            "max_expert_tokens": r["max_expert_tokens"], "threads": a.threads, "rounds": a.rounds,
            **({"device_mem": budget} if m == "auto" else {}),
        }), flush=True)
    for mode in ["none", "full"]:
        ours = ftk(a.ftk, mode, a.steps, a.threads)["tokens_per_s"]
        theirs = torch_tokens_per_s(mode, a.steps, a.threads)
        print(json.dumps({"bench": "chunk_run_vs_torch", "mode": mode, **SHAPE,
                          "ftk_tokens_per_s": round(ours, 1), "torch_tokens_per_s": round(theirs, 1),
                          "speedup": round(ours / theirs, 3), "threads": a.threads}), flush=True)


if __name__ == "__main__":
    main()
