#!/usr/bin/env python3
"""Per-op-family time and GFLOP/s of one diffusers UNet call at Stable Diffusion 1.5 size
(CFG batch 2, 64x64 latents, 2 threads by default), for comparison with diffuse-synth's
`FTK_DIFFUSE_TIMINGS=1` kernel split (conv, linear, attention, norm) on the same folder.

    .venv/bin/python testdata/gen/diffuse_synth_sd15_ref.py gen DIR       # once, 3.4 GB
    .venv/bin/python bench/diffuse_synth_sd15_profile.py DIR [--threads 2]

One warm-up call, then one call under torch.profiler. A family's time is the inclusive
wall time of its outermost aten op (conv2d, linear, scaled_dot_product_attention,
group_norm / layer_norm). FLOPs are the profiler's counts for conv and linear, and
4 b h Lq Lk d for attention (QKᵀ and PV). diffuse-synth runs the same layers, so its
GFLOP/s per family is these FLOP counts divided by its own kernel times. The profiler
adds some overhead to the diffusers times.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

FAMILY = {"aten::conv2d": "conv", "aten::linear": "linear", "aten::scaled_dot_product_attention": "attention",
          "aten::group_norm": "norm", "aten::layer_norm": "norm"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="folder made by testdata/gen/diffuse_synth_sd15_ref.py gen")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from torch.profiler import ProfilerActivity, profile

    dlogging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    unet = UNet2DConditionModel.from_pretrained(f"{a.dir}/model", subfolder="unet").eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 64, 64), generator=gen)
    ctx = torch.randn((2, 77, 768), generator=gen)
    t = torch.tensor(500)
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=ctx)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
            unet(x, t, encoder_hidden_states=ctx)
        wall = time.perf_counter() - t0

    def flops_under(ev) -> int:
        return (ev.flops or 0) + sum(flops_under(c) for c in ev.cpu_children)

    tot: dict[str, list] = {}
    for e in prof.events():
        if e.name not in FAMILY or (e.cpu_parent is not None and e.cpu_parent.name in FAMILY):
            continue
        s = tot.setdefault(FAMILY[e.name], [0.0, 0, 0])
        s[0] += e.cpu_time_total / 1e6
        s[2] += 1
        if e.name == "aten::scaled_dot_product_attention":
            (b, h, lq, d), (_, _, lk, _) = e.input_shapes[0], e.input_shapes[1]
            s[1] += 4 * b * h * lq * lk * d
        elif FAMILY[e.name] != "norm":
            s[1] += flops_under(e)
    rows = {k: {"calls": n, "s": round(sec, 3), "gflop": round(f / 1e9, 1),
                "gflop_per_s": round(f / 1e9 / sec, 1) if f else None}
            for k, (sec, f, n) in sorted(tot.items())}
    print(json.dumps({"bench": "diffuse_synth_sd15_profile", "wall_s_profiled": round(wall, 3),
                      "threads": torch.get_num_threads(), "families": rows, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
