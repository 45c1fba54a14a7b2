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


def gen_ref():
    """testdata/gen/diffuse_synth_ref.py, whose loss and weight-drawing code the
    benchmarks share with the fixtures (imported on first use: it loads diffusers)."""
    sys.path.insert(0, str(ROOT / "testdata" / "gen"))
    import diffuse_synth_ref

    return diffuse_synth_ref
BIN = Path(os.environ.get("FTK_DIFFUSE_SYNTH", ROOT / "target" / "release" / "diffuse-synth"))
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
    gen_ref().reinit(unet, gen)
    gen_ref().reinit(vae, gen)
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
    dt, rss, _, out, _ = timed_cpu(argv, env)
    return dt, rss, out


def timed_cpu(argv: list[str], env: dict | None = None) -> tuple[float, float, float, str, str]:
    """timed's wall seconds and peak RSS, the process's CPU seconds (user + sys, from
    /usr/bin/time -v), stdout and stderr."""
    if TIME:
        argv = [TIME, "-v"] + argv
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(argv)}\n{p.stderr[-3000:]}")
    rss, cpu = float("nan"), float("nan")
    for line in p.stderr.splitlines():
        if "Maximum resident set size" in line:
            rss = int(line.rsplit(":", 1)[1]) / 1024
        elif "User time (seconds)" in line:
            cpu = float(line.rsplit(":", 1)[1])
        elif "System time (seconds)" in line:
            cpu += float(line.rsplit(":", 1)[1])
    return dt, rss, cpu, p.stdout, p.stderr


def ftk_phases(stderr: str) -> dict[str, list[tuple[float, float]]]:
    """diffuse-synth's FTK_DIFFUSE_TIMINGS lines: phase kind -> [(wall s, CPU s)]."""
    out: dict[str, list[tuple[float, float]]] = {}
    for line in stderr.splitlines():
        if not line.startswith("diffuse-synth: timing: "):
            continue
        name, rest = line[len("diffuse-synth: timing: "):].rsplit(": ", 1)
        w, u, sy = (float(x.split()[0]) for x in rest.split(", "))
        out.setdefault(name.split(" (")[0].rstrip("0123456789 "), []).append((w, u + sy))
    return out


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
    tl = time.perf_counter()
    cls = getattr(diffusers, PEER_CLASSES[a.scheduler])
    sch = cls.from_pretrained(a.model, subfolder="scheduler")
    p = StableDiffusionPipeline.from_pretrained(
        a.model, scheduler=sch, safety_checker=None, text_encoder=None, tokenizer=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    p.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - tl
    e, lat = load_file(a.emb), load_file(a.lat)["latents"]
    stamps, cstamps = [], []

    def cb(pipe, i, t, kw):
        stamps.append(time.perf_counter())
        cstamps.append(time.process_time())
        return kw

    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        res = p(prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
                latents=lat.clone(), num_inference_steps=a.steps, guidance_scale=a.cfg, output_type="latent",
                callback_on_step_end=cb).images
        t1, c1 = time.perf_counter(), time.process_time()
        img = p.vae.decode(res / p.vae.config.scaling_factor, return_dict=False)[0]
        img = (img / 2 + 0.5).clamp(0, 1)
        t2, c2 = time.perf_counter(), time.process_time()
    save_file({"latents": res.contiguous(), "images": img.contiguous()}, a.out)
    steps = [b - a_ for a_, b in zip([t0] + stamps, stamps)]
    csteps = [b - a_ for a_, b in zip([c0] + cstamps, cstamps)]
    print(json.dumps({"denoise_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0, "load_s": load_s,
                      "median_step_s": statistics.median(steps), "median_step_cpu_s": statistics.median(csteps),
                      "decode_cpu_s": c2 - c1, "total_cpu_s": c2 - c0, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "diffusers": diffusers.__version__}))


# ---------------------------------------------------------------- FedCADO guidance, FedDEO describe

GUIDED_STEPS = 4  # DDPM steps of the guided case (the last stops at x0, as FedCADO)
NUM_CLASSES = 10
DESCRIBE_IMAGES = 6


def write_random_resnet18(path: Path, num_classes: int, gen) -> None:
    """A torchvision ResNet-18 state_dict with random weights and BN statistics drawn
    from `gen` (a torch.Generator), as safetensors at `path`."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    net = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    sd = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(path))


def build_guided() -> tuple[Path, Path, Path]:
    """A torchvision ResNet-18 (random weights and BN statistics, 10 classes), DDPM step
    noise for one sample, and FedDEO's images + fixed draws; generated once beside the model."""
    clf, noise, desc = OUT / "resnet18.safetensors", OUT / "step_noise.safetensors", OUT / "describe.safetensors"
    if clf.exists() and noise.exists() and desc.exists():
        return clf, noise, desc
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(SEED + 1)
    write_random_resnet18(clf, NUM_CLASSES, gen)
    s = UNET["sample_size"]
    save_file({"noise": torch.randn((GUIDED_STEPS + 1, 1, 4, s, s), generator=gen)}, str(noise))
    f = 2 ** (len(VAE["block_out_channels"]) - 1)
    n = DESCRIBE_IMAGES
    save_file({
        "images": torch.rand((n, 3, s * f, s * f), generator=gen),
        "timesteps": torch.randint(0, 1000, (n,), generator=gen),
        "latent_noise": torch.randn((n, 4, s, s), generator=gen),
        "noise": torch.randn((n, 4, s, s), generator=gen),
    }, str(desc))
    return clf, noise, desc


def guided_peer(a) -> None:
    """PyTorch running FedCADO's loop (generate_images.py) on the same folder: per step the
    gradient of CE + bn_weight * L_BN through UNet -> x0 -> VAE -> clamp -> bicubic ->
    CLIP-normalise -> ResNet-18 w.r.t. the latents only (no weight gradients), z <- z - g,
    then the plain CFG DDPM step; --noise-edit-steps BN-only updates first; the last step
    keeps x0. Load untimed."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F
    import torchvision
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae").eval().requires_grad_(False)
    sch = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    clf = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    clf.load_state_dict(load_file(a.clf), strict=False)
    clf.eval().requires_grad_(False)
    stats = gen_ref().bn_stat_terms(clf.modules())
    e = load_file(a.emb)
    ctx = torch.cat([e["negative_prompt_embeds"][:1], e["prompt_embeds"][:1]])
    lat = load_file(a.lat)["latents"][:1]
    noise = load_file(a.noise)["noise"]
    draws = iter(range(noise.shape[0]))
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    ddpm_mod.randn_tensor = lambda shape, **kw: noise[next(draws)].reshape(shape).clone()
    # StableDiffusionPipeline's config rewrite, which diffuse-synth applies too
    sch = DDPMScheduler.from_config({**sch.config, "clip_sample": False, "steps_offset": 1})
    sch.set_timesteps(a.steps)
    ts = sch.timesteps
    m = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    s = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    sf = vae.config.scaling_factor

    def eps_of(z, t):
        out = unet(torch.cat([z] * 2), t, encoder_hidden_states=ctx).sample
        eu, ec = out.chunk(2)
        return eu + a.cfg * (ec - eu)

    def grad(z, t, with_ce):
        stats.clear()
        z = z.detach().requires_grad_(True)
        eps = eps_of(z, t)
        acp = sch.alphas_cumprod[t]
        x0 = (z - (1 - acp) ** 0.5 * eps) / acp ** 0.5
        img = (vae.decode(x0 / sf).sample / 2 + 0.5).clamp(0, 1)
        img = F.interpolate(img, size=(224, 224), mode="bicubic", align_corners=False)
        logits = clf((img - m) / s)
        loss = 0.1 * sum(stats)
        if with_ce:
            loss = loss + F.cross_entropy(logits, torch.tensor([1]))
        return torch.autograd.grad(loss, z)[0]

    t0, c0 = time.perf_counter(), time.process_time()
    lat = lat * sch.init_noise_sigma
    for _ in range(a.noise_edit):
        lat = lat - grad(lat, ts[0], False)
    x0 = None
    for i, t in enumerate(ts[:-1]):
        lat = lat - grad(lat, t, True)
        with torch.no_grad():
            out = sch.step(eps_of(lat, t), t, lat)
        x0, lat = out.pred_original_sample, out.prev_sample
    t1 = time.perf_counter()
    with torch.no_grad():
        img = (vae.decode(x0 / sf).sample / 2 + 0.5).clamp(0, 1)
    t2, c2 = time.perf_counter(), time.process_time()
    save_file({"latents": x0.contiguous(), "images": img.contiguous()}, a.out)
    print(json.dumps({"loop_s": t1 - t0, "total_s": t2 - t0, "cpu_s": c2 - c0, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "diffusers": diffusers.__version__}))


def describe_peer(a) -> None:
    """PyTorch running FedDEO's description SGD (as testdata/gen's gen_describe) with the
    same images and draws: VAE encode, add_noise, MSE of the UNet's eps, gradient w.r.t.
    the description only, lr 10. Load untimed."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae").eval().requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    d = load_file(a.noise)
    desc = load_file(a.emb)["prompt_embeds"][:1].clone().requires_grad_(True)
    m = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    s = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(d["images"].shape[0]):
        x = (d["images"][k : k + 1] - m) / s
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z0 = (dist.mean + dist.std * d["latent_noise"][k : k + 1]) * vae.config.scaling_factor
        zt = sched.add_noise(z0, d["noise"][k : k + 1], d["timesteps"][k : k + 1])
        pred = unet(zt, d["timesteps"][k], encoder_hidden_states=desc).sample
        loss = F.mse_loss(pred, d["noise"][k : k + 1])
        (g,) = torch.autograd.grad(loss, desc)
        with torch.no_grad():
            desc -= 10.0 * g
    t1, c1 = time.perf_counter(), time.process_time()
    save_file({"prompt_embeds": desc.detach().contiguous()}, a.out)
    print(json.dumps({"total_s": t1 - t0, "cpu_s": c1 - c0, "threads": torch.get_num_threads(), "torch": torch.__version__}))


def run_guided(a, model, emb, lat, fenv) -> None:
    """FedCADO guidance (--noise-edit 0: the issue's loop; 10: the authors' default) and
    FedDEO describe, each ftk and PyTorch alternately, medians of --reps."""
    clf, noise, desc = build_guided()
    rows = []
    for case in a.case:
        if case == "describe":
            ftk = [str(BIN), "describe", "--model", str(model), "--images", str(desc), "--init", str(emb),
                   "--train-noise", str(desc), "--lr", "10", "-o", str(OUT / "ftk_desc.safetensors")]
            peer = [sys.executable, str(Path(__file__).resolve()), "--peer-describe", "--model", str(model),
                    "--emb", str(emb), "--noise", str(desc), "--out", str(OUT / "peer_desc.safetensors"),
                    "--threads", str(a.threads)]
            key = "prompt_embeds"
        else:
            ne = 10 if case == "fedcado-edit" else 0
            ftk = [str(BIN), "--model", str(model), "--scheduler", "ddpm", "--steps", str(GUIDED_STEPS),
                   "--guidance-scale", str(a.cfg), "--prompt-embeds", str(emb), "--latents", str(lat),
                   "--step-noise", str(noise), "--classifier", str(clf), "--classifier-arch", "resnet18",
                   "--class", "1", "--noise-edit-steps", str(ne), "-o", str(OUT / "ftk_guided.safetensors")]
            peer = [sys.executable, str(Path(__file__).resolve()), "--peer-guided", "--model", str(model),
                    "--emb", str(emb), "--lat", str(lat), "--noise", str(noise), "--clf", str(clf),
                    "--steps", str(GUIDED_STEPS), "--cfg", str(a.cfg), "--noise-edit", str(ne),
                    "--out", str(OUT / "peer_guided.safetensors"), "--threads", str(a.threads)]
            key = "latents"
        fs, ps, frss, prss, fcpu, pcpu = [], [], [], [], [], []
        for _ in range(a.reps):
            dt, rss, cpu, _, _ = timed_cpu(ftk, fenv)
            fs.append(dt)
            frss.append(rss)
            fcpu.append(cpu)
            dt, rss, out = timed(peer)
            pr = json.loads(out.strip().splitlines()[-1])
            ps.append(pr["total_s"])
            pcpu.append(pr["cpu_s"])
            prss.append(rss)
        import numpy as np
        from safetensors.numpy import load_file

        fo = "ftk_desc" if case == "describe" else "ftk_guided"
        po = "peer_desc" if case == "describe" else "peer_guided"
        fl = load_file(str(OUT / f"{fo}.safetensors"))[key]
        pl = load_file(str(OUT / f"{po}.safetensors"))[key]
        diff = float(np.abs(fl - pl).max())
        scale = float(np.abs(pl).max())
        ftk_s, peer_s = statistics.median(fs), statistics.median(ps)
        rows.append({
            "bench": f"diffuse_synth_{case.replace('-', '_')}",
            "ftk_s": round(ftk_s, 3),
            "peer_s": round(peer_s, 3),
            "speedup": round(peer_s / ftk_s, 3),
            "ftk_cpu_s": round(statistics.median(fcpu), 3),
            "peer_cpu_s": round(statistics.median(pcpu), 3),
            "cpu_speedup": round(statistics.median(pcpu) / statistics.median(fcpu), 3),
            "ftk_s_all": [round(x, 3) for x in fs],
            "peer_s_all": [round(x, 3) for x in ps],
            "ftk_max_rss_mib": round(max(frss), 1),
            "peer_max_rss_mib": round(max(prss), 1),
            "max_abs_diff": diff,
            "max_abs_peer": scale,
            "threads": a.threads or os.cpu_count(),
            "reps": a.reps,
            "ftk_s_includes": "process start, load, the loop, decode, write",
            "peer_s_includes": "the loop (+ decode for FedCADO); load excluded",
            "cpu_s_includes": "ftk: user + sys of the whole process; peer: process time of the timed part",
            "workload": (f"{DESCRIBE_IMAGES} SGD steps, description [1,{TOKENS},{UNET['cross_attention_dim']}]"
                         if case == "describe" else
                         f"DDPM {GUIDED_STEPS} steps (x0 at the last), CFG {a.cfg}, ResNet-18 at 224, "
                         f"{10 if case == 'fedcado-edit' else 0} noise-editing steps"),
        })
        print(json.dumps(rows[-1]), flush=True)


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
    ap.add_argument("--case", action="append", choices=["steps", "fedcado", "fedcado-edit", "describe"],
                    help="what to compare (repeatable; default: steps): plain sampling steps, FedCADO-guided "
                         "DDPM (no noise editing / the authors' 10 steps), FedDEO describe")
    ap.add_argument("--sd15", type=Path, metavar="DIR",
                    help="the steps case on a Stable Diffusion 1.5-sized folder made by "
                         "testdata/gen/diffuse_synth_sd15_ref.py gen DIR (512x512, batch 1; "
                         "agreement required within 1e-4 of the latents' scale)")
    ap.add_argument("--ftk-env", action="append", default=[], metavar="K=V",
                    help="extra environment for diffuse-synth only (diagnosis, e.g. CANDLE_NUM_THREADS=1)")
    # internal: the diffusers side, run in its own process so its RSS is its own
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-guided", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-describe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--clf", help=argparse.SUPPRESS)
    ap.add_argument("--noise", help=argparse.SUPPRESS)
    ap.add_argument("--noise-edit", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--emb", help=argparse.SUPPRESS)
    ap.add_argument("--lat", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer:
        return peer(a)
    if a.peer_guided:
        return guided_peer(a)
    if a.peer_describe:
        return describe_peer(a)
    if not 1 <= a.batch <= MAX_BATCH or a.steps < 2:
        sys.exit(f"--batch must be 1..{MAX_BATCH} and --steps >= 2")
    if not BIN.exists():
        sys.exit(f"{BIN} missing: run `cargo build --release -p diffuse-synth` first")
    if a.sd15:
        model, inputs = a.sd15 / "model", a.sd15 / "inputs.safetensors"
        emb = lat = inputs
        a.batch = 1
        OUT.mkdir(parents=True, exist_ok=True)
    else:
        model, inputs = build()
        emb, lat = slice_inputs(inputs, a.batch)
    threads = a.threads or os.cpu_count() or 1
    fenv = dict(os.environ, RAYON_NUM_THREADS=str(threads), **dict(kv.split("=", 1) for kv in a.ftk_env))
    cases = a.case or ["steps"]
    a.case = [c for c in cases if c != "steps"]
    if a.case:
        emb1, lat1 = slice_inputs(inputs, 1)
        run_guided(a, model, emb1, lat1, fenv)
    if "steps" not in cases:
        return
    f_out, p_out = OUT / "ftk_out.safetensors", OUT / "peer_out.safetensors"

    # ftk's phases (load, each step, decode, write) from its FTK_DIFFUSE_TIMINGS lines;
    # wall and CPU (user + sys) seconds on both sides, the machine being shared.
    tenv = dict(fenv, FTK_DIFFUSE_TIMINGS="1")
    fs, fcpu, frss, fph, ps, prss, peers = [], [], [], [], [], [], []
    for _ in range(a.reps):
        dt, rss, cpu, _, err = timed_cpu(ftk_argv(model, emb, lat, a, a.steps, f_out), tenv)
        fs.append(dt)
        fcpu.append(cpu)
        frss.append(rss)
        fph.append(ftk_phases(err))
        dt, rss, _, out, _ = timed_cpu(peer_argv(model, emb, lat, a, a.steps, p_out))
        pr = json.loads(out.strip().splitlines()[-1])
        ps.append(pr["total_s"])
        prss.append(rss)
        peers.append(pr)
    ftk_s, peer_s = statistics.median(fs), statistics.median(ps)

    def ph(kind: str, i: int) -> float:
        """Median over reps of the median (steps) or sum (other phases) of `kind`."""
        vals = []
        for f in fph:
            xs = [x[i] for x in f.get(kind, [])]
            if xs:
                vals.append(statistics.median(xs) if kind == "step" else sum(xs))
        # nan for a binary without the timers (an older build under FTK_DIFFUSE_SYNTH)
        return statistics.median(vals) if vals else float("nan")

    import numpy as np
    from safetensors.numpy import load_file

    fl, pl = load_file(str(f_out)), load_file(str(p_out))
    diff = float(np.abs(fl["latents"] - pl["latents"]).max())
    img_diff = float(np.abs(fl["images"] - pl["images"]).max())
    scale = float(np.abs(pl["latents"]).max())
    tol = 1e-4 * scale if a.sd15 else 1e-2 * max(scale, 1.0)
    if not np.isfinite(diff) or diff > tol:
        sys.exit(f"FAIL: final latents differ: max abs diff {diff} (max |latent| {scale})")
    ftk_step = ph("step", 0)
    peer_step = statistics.median(p["median_step_s"] for p in peers)
    pmed = lambda k: round(statistics.median(p[k] for p in peers), 3)  # noqa: E731
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
        "peer_denoise_s": pmed("denoise_s"),
        "ftk_step_s": round(ftk_step, 4),
        "peer_step_s": round(peer_step, 4),
        "step_speedup": round(peer_step / ftk_step, 3) if ftk_step > 0 else None,  # nan > 0: False
        "ftk_step_cpu_s": round(ph("step", 1), 3),
        "peer_step_cpu_s": pmed("median_step_cpu_s"),
        "ftk_decode_s": round(ph("vae decode", 0), 3),
        "peer_decode_s": pmed("decode_s"),
        "ftk_decode_cpu_s": round(ph("vae decode", 1), 3),
        "peer_decode_cpu_s": pmed("decode_cpu_s"),
        "ftk_load_s": round(ph("load unet", 0) + ph("load vae", 0), 3),
        "peer_load_s": pmed("load_s"),
        "ftk_cpu_s": round(statistics.median(fcpu), 3),
        "ftk_cpu_s_includes": "the whole process (user + sys)",
        "peer_cpu_s": pmed("total_cpu_s"),
        "max_abs_diff_images": img_diff,
        "peer_threads": peers[0]["threads"],
        "ftk_env": a.ftk_env,
        "reps": a.reps,
        "unet": "sd15" if a.sd15 else {k: UNET[k] for k in ("sample_size", "block_out_channels", "layers_per_block",
                                                            "cross_attention_dim")},
        "max_abs_latent": scale,
        "torch": peers[0]["torch"],
        "diffusers": peers[0]["diffusers"],
    }))


if __name__ == "__main__":
    main()
