#!/usr/bin/env python3
"""diffuse-synth benchmark: denoising steps per second against diffusers +
PyTorch on CPU, same model folder, scheduler, inputs and thread count.

    cargo build --release -p diffuse-synth
    .venv/bin/python bench/diffuse_synth_bench.py            # DDIM, 10 steps, CFG 3, batch 2

Builds once (seeded, under bench/out/diffuse-synth/) a mid-size random
StableDiffusionPipeline folder (save_pretrained) plus prompt embeddings and
initial latents. Then runs, side by side, `target/release/diffuse-synth` and
diffusers' StableDiffusionPipeline (in its own Python process), both under
`/usr/bin/time -v`, and prints one JSON line per case. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "diffuse-synth"
OUT = ROOT / "bench" / "out" / "diffuse-synth"
TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None

# The mid-size random model: SD 1.x layout, scaled down so a 10-step run takes
# seconds on 2 cores while the UNet still dominates (the VAE is deliberately small).
SEED = 20240901
TOKENS = 77
UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=256,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)
# Stable Diffusion 1.5's scheduler config with DDIM as the folder's class.
SCHED = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
MAX_BATCH = 8  # inputs are generated for this many samples; a run takes the first --batch


def spec() -> dict:
    return {"seed": SEED, "tokens": TOKENS, "unet": UNET, "vae": VAE, "sched": SCHED, "max_batch": MAX_BATCH}


def reinit(module, gen):
    """As testdata/gen/diffuse_synth_ref.py: every parameter redrawn so none is zero
    (diffusers zero-initialises some output projections): weights N(0, 1/fan_in),
    biases N(0, 0.05^2), norm scales 1 + N(0, 0.1^2)."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def build() -> tuple[Path, Path]:
    """The model folder and the inputs file, generated once (reused while spec() matches)."""
    model, inputs, stamp = OUT / "model", OUT / "inputs.safetensors", OUT / "spec.json"
    want = json.dumps(spec(), sort_keys=True)
    if stamp.exists() and stamp.read_text() == want and inputs.exists() and (model / "model_index.json").exists():
        return model, inputs
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from safetensors.torch import save_file

    dlogging.set_verbosity_error()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    reinit(unet, gen)
    reinit(vae, gen)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler.from_config(SCHED),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    pipe.save_pretrained(str(model), safe_serialization=True)
    d, s = UNET["cross_attention_dim"], UNET["sample_size"]
    t = {
        "prompt_embeds": torch.randn((MAX_BATCH, TOKENS, d), generator=gen),
        "negative_prompt_embeds": torch.randn((MAX_BATCH, TOKENS, d), generator=gen),
        "latents": torch.randn((MAX_BATCH, 4, s, s), generator=gen),
    }
    save_file(t, str(inputs))
    stamp.write_text(want)
    params = sum(p.numel() for p in unet.parameters())
    print(f"# built {model} (UNet {params / 1e6:.1f} M params) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, inputs


def slice_inputs(inputs: Path, batch: int) -> tuple[Path, Path]:
    """prompt/negative embeddings and latents for the first `batch` samples."""
    emb, lat = OUT / f"emb_b{batch}.safetensors", OUT / f"latents_b{batch}.safetensors"
    if emb.exists() and lat.exists() and emb.stat().st_mtime >= inputs.stat().st_mtime:
        return emb, lat
    from safetensors.numpy import load_file, save_file

    t = load_file(str(inputs))
    save_file({k: t[k][:batch].copy() for k in ("prompt_embeds", "negative_prompt_embeds")}, str(emb))
    save_file({"latents": t["latents"][:batch].copy()}, str(lat))
    return emb, lat


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall seconds from spawn to exit, peak RSS in MiB (/usr/bin/time -v), stdout."""
    if TIME:
        argv = [TIME, "-v"] + argv
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(argv)}\n{p.stderr[-3000:]}")
    rss = float("nan")
    for line in p.stderr.splitlines():
        if "Maximum resident set size" in line:
            rss = int(line.rsplit(":", 1)[1]) / 1024
    return dt, rss, p.stdout


def ftk_argv(model, emb, lat, a, steps, out) -> list[str]:
    return [str(BIN), "--model", str(model), "--scheduler", a.scheduler, "--steps", str(steps),
            "--guidance-scale", str(a.cfg), "--prompt-embeds", str(emb), "--latents", str(lat), "-o", str(out)]


def peer_argv(model, emb, lat, a, steps, out) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--peer", "--model", str(model), "--emb", str(emb),
            "--lat", str(lat), "--scheduler", a.scheduler, "--steps", str(steps), "--cfg", str(a.cfg),
            "--out", str(out), "--threads", str(a.threads)]


PEER_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
}


def peer(a) -> None:
    """diffusers in this process: load (untimed), then the pipeline call (denoising,
    output_type="latent") and the VAE decode + postprocessing the tool also does (timed).
    Prints one JSON line; writes the final latents to --out."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import diffusers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging
    from safetensors.torch import load_file, save_file

    dlogging.set_verbosity_error()
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    cls = getattr(diffusers, PEER_CLASSES[a.scheduler])
    sch = cls.from_pretrained(a.model, subfolder="scheduler")
    p = StableDiffusionPipeline.from_pretrained(
        a.model, scheduler=sch, safety_checker=None, text_encoder=None, tokenizer=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    p.set_progress_bar_config(disable=True)
    e, lat = load_file(a.emb), load_file(a.lat)["latents"]
    stamps = []

    def cb(pipe, i, t, kw):
        stamps.append(time.perf_counter())
        return kw

    with torch.inference_mode():
        t0 = time.perf_counter()
        res = p(prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
                latents=lat.clone(), num_inference_steps=a.steps, guidance_scale=a.cfg, output_type="latent",
                callback_on_step_end=cb).images
        t1 = time.perf_counter()
        img = p.vae.decode(res / p.vae.config.scaling_factor, return_dict=False)[0]
        img = (img / 2 + 0.5).clamp(0, 1)
        t2 = time.perf_counter()
    save_file({"latents": res.contiguous(), "images": img.contiguous()}, a.out)
    steps = [b - a_ for a_, b in zip([t0] + stamps, stamps)]
    print(json.dumps({"denoise_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0,
                      "median_step_s": statistics.median(steps), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "diffusers": diffusers.__version__}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheduler", default="ddim", choices=list(PEER_CLASSES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1, help="runs of each (interleaved); the median is reported")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both sides (default: all cores); 1 compares single-core speed, "
                         "which other load on the machine disturbs least")
    ap.add_argument("--ftk-env", action="append", default=[], metavar="K=V",
                    help="extra environment for diffuse-synth only (diagnosis, e.g. CANDLE_NUM_THREADS=1)")
    # internal: the diffusers side, run in its own process so its RSS is its own
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--emb", help=argparse.SUPPRESS)
    ap.add_argument("--lat", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer:
        return peer(a)
    if not 1 <= a.batch <= MAX_BATCH or a.steps < 2:
        sys.exit(f"--batch must be 1..{MAX_BATCH} and --steps >= 2")
    if not BIN.exists():
        sys.exit(f"{BIN} missing: run `cargo build --release -p diffuse-synth` first")
    model, inputs = build()
    emb, lat = slice_inputs(inputs, a.batch)
    threads = a.threads or os.cpu_count() or 1
    fenv = dict(os.environ, RAYON_NUM_THREADS=str(threads), **dict(kv.split("=", 1) for kv in a.ftk_env))
    f_out, p_out = OUT / "ftk_out.safetensors", OUT / "peer_out.safetensors"

    # ftk has no per-step timer: its per-step time is (T(steps) - T(1)) / (steps - 1),
    # which cancels load, decode and write (one extra 1-step run, not in ftk_s).
    f1, _, _ = timed(ftk_argv(model, emb, lat, a, 1, OUT / "ftk_1step.safetensors"), fenv)
    fs, frss, ps, prss, peers = [], [], [], [], []
    for _ in range(a.reps):
        dt, rss, _ = timed(ftk_argv(model, emb, lat, a, a.steps, f_out), fenv)
        fs.append(dt)
        frss.append(rss)
        dt, rss, out = timed(peer_argv(model, emb, lat, a, a.steps, p_out))
        pr = json.loads(out.strip().splitlines()[-1])
        ps.append(pr["total_s"])
        prss.append(rss)
        peers.append(pr)
    ftk_s, peer_s = statistics.median(fs), statistics.median(ps)

    import numpy as np
    from safetensors.numpy import load_file

    fl, pl = load_file(str(f_out)), load_file(str(p_out))
    diff = float(np.abs(fl["latents"] - pl["latents"]).max())
    img_diff = float(np.abs(fl["images"] - pl["images"]).max())
    scale = float(np.abs(pl["latents"]).max())
    if not np.isfinite(diff) or diff > 1e-2 * max(scale, 1.0):
        sys.exit(f"FAIL: final latents differ: max abs diff {diff} (max |latent| {scale})")
    ftk_step = (ftk_s - f1) / (a.steps - 1)
    peer_step = statistics.median(p["median_step_s"] for p in peers)
    print(json.dumps({
        "bench": "diffuse_synth_steps",
        "scheduler": a.scheduler,
        "steps": a.steps,
        "batch": a.batch,
        "cfg": a.cfg,
        "ftk_s": round(ftk_s, 3),
        "peer_s": round(peer_s, 3),
        "ftk_steps_per_s": round(a.steps / ftk_s, 3),
        "peer_steps_per_s": round(a.steps / peer_s, 3),
        "speedup": round(peer_s / ftk_s, 3),
        "ftk_max_rss_mib": round(max(frss), 1),
        "peer_max_rss_mib": round(max(prss), 1),
        "max_abs_diff": diff,
        "threads": threads,
        # extras
        "ftk_s_includes": "process start, model load, denoising, VAE decode, write",
        "peer_s_includes": "pipeline call (denoising) + VAE decode; load excluded",
        "peer_denoise_s": round(statistics.median(p["denoise_s"] for p in peers), 3),
        "ftk_step_s": round(ftk_step, 4),
        "peer_step_s": round(peer_step, 4),
        "step_speedup": round(peer_step / ftk_step, 3) if ftk_step > 0 else None,
        "max_abs_diff_images": img_diff,
        "peer_threads": peers[0]["threads"],
        "ftk_env": a.ftk_env,
        "reps": a.reps,
        "unet": {k: UNET[k] for k in ("sample_size", "block_out_channels", "layers_per_block", "cross_attention_dim")},
        "torch": peers[0]["torch"],
        "diffusers": peers[0]["diffusers"],
    }))


if __name__ == "__main__":
    main()
