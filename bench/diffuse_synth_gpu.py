#!/usr/bin/env python3
"""diffuse-synth on a GPU (issue 16): one JSON line per measurement. Not part of
`make test`; needs a binary built with the `cuda` feature and a CUDA device.

Build (any machine, no GPU or CUDA toolkit needed; pulls the CUDA 13.0 nvcc wheels):
    tools/diffuse-synth/cuda/build.sh build          # -> target/release/diffuse-synth
On the GPU machine (nothing to download there):
    python3 bench/diffuse_synth_gpu.py --case agree                 # seconds; Python stdlib only
    python3 bench/diffuse_synth_gpu.py --case sd15 --case fedcado   # needs torch (CUDA) + diffusers

Cases:
  agree    the checked-in tiny pipelines (CFG, --prompt, FedCADO with a JSON classifier and
           a torchvision ResNet-18, FedDISC unCLIP, FedDEO describe): --device cuda in f32,
           bf16 and f16 against --device cpu of the same binary; max |cuda - cpu| / max |cpu|
           with a pass mark (f32 1e-3, half 5e-2).
  sd15     an SD-1.5-shaped random folder (testdata/gen/diffuse_synth_sd15_ref.py gen),
           512x512, DDIM, CFG 7.5, --steps (50), batch 1 and 8: diffuse-synth --device cuda
           against diffusers' StableDiffusionPipeline on the same GPU, same latents and
           embeddings, f32 (TF32 off on both sides) and f16. Per-step time (ftk: the
           difference of a --steps and a --short-steps run, so load/decode cancel; diffusers:
           median step from its callback), whole run (ftk process; diffusers process incl.
           load), peak device memory (nvidia-smi, per process; torch's max_memory_allocated
           too), and agreement of the final latents with diffusers.
  fedcado  the FedCADO-guided loop at SD-1.5 size (DDPM --guided-steps, CFG 3, ResNet-18 at
           224, 0 noise-editing steps): ftk against the same loop in PyTorch on the GPU
           (bench/diffuse_synth_bench.py's guided peer, moved to CUDA).

The folder (3.4 GB) and inputs go under --work (default bench/out/diffuse-synth-gpu).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gen_ref():
    """testdata/gen/diffuse_synth_ref.py, whose loss and weight-drawing code the
    benchmarks share with the fixtures (imported on first use: it loads diffusers)."""
    sys.path.insert(0, str(ROOT / "testdata" / "gen"))
    import diffuse_synth_ref

    return diffuse_synth_ref
TD = ROOT / "testdata" / "diffuse-synth"
TOL = {"f32": 1e-3, "bf16": 5e-2, "f16": 5e-2}


# ---------------------------------------------------------------- stdlib helpers

def read_f32(path: Path, key: str) -> list[float]:
    """One tensor of a safetensors file as floats (F32/F16/BF16; stdlib only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        t = hdr[key]
        a, b = t["data_offsets"]
        f.seek(8 + n + a)
        raw = f.read(b - a)
    if t["dtype"] == "F32":
        v = array("f")
        v.frombytes(raw)
        return list(v)
    if t["dtype"] == "F16":
        return [x[0] for x in struct.iter_unpack("<e", raw)]
    if t["dtype"] == "BF16":
        u = array("H")
        u.frombytes(raw)
        return [struct.unpack("<f", struct.pack("<I", x << 16))[0] for x in u]
    raise SystemExit(f"{path}: {key} is {t['dtype']}")


def rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    scale = max(max(abs(x) for x in b), 1e-6)
    return max(abs(x - y) for x, y in zip(a, b)) / scale


def cuda_lib_env(work: Path) -> dict:
    """The environment for diffuse-synth: LD_LIBRARY_PATH extended with the CUDA library
    folders PyTorch's wheels bring (cuBLAS, cuBLASLt, cuRAND), which are not on the
    loader's path by default, and a folder of unversioned links for libraries found only
    under CUDA 13 names (the loader tries libX.so and libX.so.12, not .so.13)."""
    env = dict(os.environ, FTK_NO_PROGRESS="1")
    dirs = []
    for sp in sys.path:
        nv = Path(sp) / "nvidia"
        if nv.is_dir():
            dirs += [str(d) for d in sorted(nv.glob("*/lib")) + sorted(nv.glob("cu*/lib")) if d.is_dir()]
    for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"):
        if Path(d).is_dir():
            dirs.append(d)
    links = work / "cuda-links"
    links.mkdir(parents=True, exist_ok=True)
    for lib in ("libcublas", "libcublasLt", "libcurand"):
        if any((Path(d) / f"{lib}.so").exists() or (Path(d) / f"{lib}.so.12").exists() for d in dirs):
            continue
        found = [f for d in dirs for f in sorted(Path(d).glob(f"{lib}.so.*"))]
        if found:
            dst = links / f"{lib}.so"
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(found[-1])
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = ":".join([str(links)] + dirs + ([old] if old else []))
    return env


class PeakMem:
    """Peak device memory of one process (MiB, nvidia-smi's per-process figure, which
    includes the CUDA context), sampled every 0.1 s while the process runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.ok = pid, 0, shutil.which("nvidia-smi") is not None
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while self.ok and not self.stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                self.ok = False
                return
            for line in out.splitlines():
                parts = [x.strip() for x in line.split(",")]
                if len(parts) == 2 and parts[0] == str(self.pid) and parts[1].isdigit():
                    self.peak = max(self.peak, int(parts[1]))
            time.sleep(0.1)

    def done(self):
        self.stop.set()
        self.t.join()
        return self.peak if self.ok else None


def timed(argv: list[str], env: dict | None = None) -> tuple[float, int | None, str]:
    """Wall seconds from spawn to exit, peak device MiB, stdout; exits on failure."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    mem = PeakMem(p.pid)
    out, err = p.communicate()
    dt = time.perf_counter() - t0
    peak = mem.done()
    if p.returncode != 0:
        sys.exit(f"FAIL ({p.returncode}): {' '.join(argv)}\n{err[-3000:]}")
    return dt, peak, out


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


# ---------------------------------------------------------------- agree (tiny fixtures)

def agree_cases() -> list[tuple[str, list[str], str]]:
    tiny, pipe = str(TD / "tiny-sd"), str(TD / "pipeline.safetensors")
    desc = str(TD / "describe.safetensors")
    common = ["--guidance-scale", "3", "--prompt-embeds", pipe, "--seed", "7", "--batch", "2"]
    return [
        ("cfg-dpmpp", ["--model", tiny, "--scheduler", "dpmpp-2m", "--karras", "--steps", "10"] + common, "images"),
        ("prompt-ddim", ["--model", tiny, "--scheduler", "ddim", "--steps", "10", "--guidance-scale", "3",
                         "--prompt", "a photo of a cat", "--negative-prompt", "blurry", "--seed", "7",
                         "--batch", "2"], "latents"),
        ("fedcado-json", ["--model", tiny, "--scheduler", "ddpm", "--steps", "10"] + common +
         ["--classifier", str(TD / "classifier.safetensors"), "--classifier-arch", str(TD / "classifier.json"),
          "--class", "1", "--classifier-size", "12"], "latents"),
        ("fedcado-resnet18", ["--model", tiny, "--scheduler", "ddpm", "--steps", "10"] + common +
         ["--noise-edit-steps", "2", "--classifier", str(TD / "resnet18-narrow.safetensors"),
          "--classifier-arch", "resnet18", "--class", "3", "--classifier-size", "36"], "latents"),
        ("feddisc-unclip", ["--model", str(TD / "tiny-unclip"), "--prompt-embeds", str(TD / "unclip.safetensors"),
                            "--image-embeds", str(TD / "feddisc.safetensors"), "--class", "1", "--seed", "7",
                            "--batch", "2", "--global-embeds", str(TD / "feddisc.safetensors")], "latents"),
        ("describe", ["describe", "--model", tiny, "--images", desc, "--init", desc, "--lr", "10",
                      "--seed", "0"], "prompt_embeds"),
    ]


def run_agree(a, env) -> bool:
    ok_all = True
    out = a.work / "agree"
    out.mkdir(parents=True, exist_ok=True)
    for name, args, key in agree_cases():
        ref = out / f"{name}-cpu.safetensors"
        tc, _, _ = timed([a.bin] + args + ["--device", "cpu", "-o", str(ref)], env)
        want = read_f32(ref, key)
        for dtype in a.dtypes:
            o = out / f"{name}-cuda-{dtype}.safetensors"
            tg, peak, _ = timed([a.bin] + args + ["--device", "cuda", "--dtype", dtype, "-o", str(o)], env)
            d = rel_diff(read_f32(o, key), want)
            ok = d <= TOL[dtype]
            ok_all &= ok
            emit({"bench": "diffuse_synth_gpu_agree", "case": name, "dtype": dtype, "key": key,
                  "rel_diff_vs_cpu": d, "tolerance": TOL[dtype], "ok": ok, "cuda_s": round(tg, 3),
                  "cpu_s": round(tc, 3), "peak_device_mib": peak})
    return ok_all


# ---------------------------------------------------------------- SD-1.5 size

def sd15_folder(a) -> Path:
    d = a.work / "sd15"
    if not (d / "model" / "unet" / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "testdata/gen/diffuse_synth_sd15_ref.py"), "gen", str(d)],
                       check=True)
    return d / "model"


def sd15_inputs(a, batch: int) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    emb, lat = a.work / f"emb_b{batch}.safetensors", a.work / f"lat_b{batch}.safetensors"
    if not (emb.exists() and lat.exists()):
        g = torch.Generator().manual_seed(1000 + batch)
        save_file({"prompt_embeds": torch.randn((batch, 77, 768), generator=g),
                   "negative_prompt_embeds": torch.randn((batch, 77, 768), generator=g)}, str(emb))
        save_file({"latents": torch.randn((batch, 4, 64, 64), generator=g)}, str(lat))
    return emb, lat


def peer_sd15(a) -> None:
    """diffusers on the GPU in this process: load, warm-up step, then the pipeline call
    (latent output) + VAE decode, timed."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import diffusers
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as dlogging
    from safetensors.torch import load_file, save_file

    dlogging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    sch = DDIMScheduler.from_pretrained(a.model, subfolder="scheduler")
    p = StableDiffusionPipeline.from_pretrained(
        a.model, scheduler=sch, safety_checker=None, text_encoder=None, tokenizer=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False, torch_dtype=dt,
    ).to("cuda")
    p.set_progress_bar_config(disable=True)
    e = {k: v.to("cuda", dt) for k, v in load_file(a.emb).items()}
    lat = load_file(a.lat)["latents"].to("cuda", dt)
    stamps = []

    def cb(pipe, i, t, kw):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kw

    with torch.inference_mode():
        p(prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
          latents=lat.clone(), num_inference_steps=2, guidance_scale=7.5, output_type="latent")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = p(prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
                latents=lat.clone(), num_inference_steps=a.steps, guidance_scale=7.5, output_type="latent",
                callback_on_step_end=cb).images
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        img = (p.vae.decode(res / p.vae.config.scaling_factor, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    save_file({"latents": res.float().contiguous().cpu()}, a.out)
    steps = sorted(b - a_ for a_, b in zip([t0] + stamps, stamps))
    print(json.dumps({"denoise_s": t1 - t0, "decode_s": t2 - t1, "median_step_s": steps[len(steps) // 2],
                      "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                      "torch": torch.__version__, "diffusers": diffusers.__version__,
                      "gpu": torch.cuda.get_device_name()}))


def run_sd15(a, env) -> None:
    model = sd15_folder(a)
    for batch in a.batches:
        emb, lat = sd15_inputs(a, batch)
        for dtype in a.dtypes:
            runs = {}
            for steps in (a.short_steps, a.steps):
                o = a.work / f"ftk_b{batch}_{dtype}_{steps}.safetensors"
                runs[steps] = timed([a.bin, "--model", str(model), "--scheduler", "ddim", "--steps", str(steps),
                                     "--guidance-scale", "7.5", "--prompt-embeds", str(emb), "--latents", str(lat),
                                     "--device", "cuda", "--dtype", dtype, "-o", str(o)], env)
            ftk_total, ftk_peak, _ = runs[a.steps]
            ftk_step = (runs[a.steps][0] - runs[a.short_steps][0]) / (a.steps - a.short_steps)
            po = a.work / f"peer_b{batch}_{dtype}.safetensors"
            pt, ppeak, pout = timed([sys.executable, str(Path(__file__).resolve()), "--peer-sd15", "--model",
                                     str(model), "--emb", str(emb), "--lat", str(lat), "--steps", str(a.steps),
                                     "--dtype", dtype, "--out", str(po)])
            pr = json.loads(pout.strip().splitlines()[-1])
            d = rel_diff(read_f32(a.work / f"ftk_b{batch}_{dtype}_{a.steps}.safetensors", "latents"),
                         read_f32(po, "latents"))
            emit({"bench": "diffuse_synth_gpu_sd15", "batch": batch, "dtype": dtype, "steps": a.steps,
                  "ftk_step_s": round(ftk_step, 4), "peer_step_s": round(pr["median_step_s"], 4),
                  "step_speedup": round(pr["median_step_s"] / ftk_step, 3),
                  "ftk_total_s": round(ftk_total, 3), "peer_total_s": round(pt, 3),
                  "total_speedup": round(pt / ftk_total, 3),
                  "peer_denoise_decode_s": round(pr["denoise_s"] + pr["decode_s"], 3),
                  "ftk_peak_device_mib": ftk_peak, "peer_peak_device_mib": ppeak,
                  "peer_max_memory_allocated_mib": round(pr["max_memory_allocated_mib"], 1),
                  "rel_diff_latents_vs_diffusers": d, "gpu": pr["gpu"], "torch": pr["torch"],
                  "diffusers": pr["diffusers"],
                  "ftk_total_includes": "process start, load, steps, VAE decode, write",
                  "peer_total_includes": "process start, import, load, warm-up, steps, VAE decode"})


# ---------------------------------------------------------------- FedCADO-guided loop

def run_fedcado(a, env) -> None:
    import torch
    from safetensors.torch import save_file

    model = sd15_folder(a)
    emb, lat = sd15_inputs(a, 1)
    clf = a.work / "resnet18.safetensors"
    noise = a.work / f"step_noise_{a.guided_steps}.safetensors"
    if not clf.exists():
        from diffuse_synth_bench import write_random_resnet18  # beside this script

        write_random_resnet18(clf, 10, torch.Generator().manual_seed(16))
    if not noise.exists():
        g = torch.Generator().manual_seed(17)
        save_file({"noise": torch.randn((a.guided_steps + 1, 1, 4, 64, 64), generator=g)}, str(noise))
    for dtype in a.dtypes:
        fo = a.work / f"ftk_guided_{dtype}.safetensors"
        ft, fpeak, _ = timed([a.bin, "--model", str(model), "--scheduler", "ddpm", "--steps", str(a.guided_steps),
                              "--guidance-scale", "3", "--prompt-embeds", str(emb), "--latents", str(lat),
                              "--step-noise", str(noise), "--classifier", str(clf), "--classifier-arch", "resnet18",
                              "--class", "1", "--noise-edit-steps", "0", "--device", "cuda", "--dtype", dtype,
                              "-o", str(fo)], env)
        po = a.work / "peer_guided.safetensors"
        pt, ppeak, pout = timed([sys.executable, str(Path(__file__).resolve()), "--peer-guided", "--model",
                                 str(model), "--emb", str(emb), "--lat", str(lat), "--noise", str(noise),
                                 "--clf", str(clf), "--steps", str(a.guided_steps), "--out", str(po)])
        pr = json.loads(pout.strip().splitlines()[-1])
        d = rel_diff(read_f32(fo, "latents"), read_f32(po, "latents"))
        emit({"bench": "diffuse_synth_gpu_fedcado", "dtype": dtype, "steps": a.guided_steps,
              "ftk_s": round(ft, 3), "peer_s": round(pt, 3), "speedup": round(pt / ft, 3),
              "peer_loop_decode_s": round(pr["total_s"], 3),
              "ftk_peak_device_mib": fpeak, "peer_peak_device_mib": ppeak,
              "rel_diff_x0_vs_pytorch_f32": d,
              "workload": f"DDPM {a.guided_steps} steps (x0 at the last), CFG 3, ResNet-18 at 224, "
                          "SD-1.5-shaped UNet/VAE at 512x512, batch 1",
              "both_s_include": "process start, load, loop, decode"})


def peer_guided(a) -> None:
    """FedCADO's loop (generate_images.py) in PyTorch on the GPU, as the CPU bench's guided
    peer (bench/diffuse_synth_bench.py) runs it: per step the gradient of CE + 0.1 L_BN through
    UNet -> x0 -> VAE -> clamp -> bicubic -> CLIP-normalise -> ResNet-18 w.r.t. the latents,
    z <- z - g, then the plain CFG DDPM step; the last step keeps x0. f32, no TF32; load
    included in the process time, the loop + decode in total_s."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F
    import torchvision
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda"
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet").to(dev).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae").to(dev).eval().requires_grad_(False)
    sch = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    clf = torchvision.models.resnet18(num_classes=10)
    clf.load_state_dict(load_file(a.clf), strict=False)
    clf = clf.to(dev).eval().requires_grad_(False)
    stats = gen_ref().bn_stat_terms(clf.modules())
    e = load_file(a.emb)
    ctx = torch.cat([e["negative_prompt_embeds"][:1], e["prompt_embeds"][:1]]).to(dev)
    lat = load_file(a.lat)["latents"][:1].to(dev)
    noise = load_file(a.noise)["noise"].to(dev)
    draws = iter(range(noise.shape[0]))
    ddpm_mod.randn_tensor = lambda shape, **kw: noise[next(draws)].reshape(shape).clone()
    sch = DDPMScheduler.from_config({**sch.config, "clip_sample": False, "steps_offset": 1})
    sch.set_timesteps(a.steps)
    ts = sch.timesteps
    acps = sch.alphas_cumprod.to(dev)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev).view(1, 3, 1, 1)
    target = torch.tensor([1], device=dev)
    sf = vae.config.scaling_factor

    def eps_of(z, t):
        out = unet(torch.cat([z] * 2), t, encoder_hidden_states=ctx).sample
        eu, ec = out.chunk(2)
        return eu + 3.0 * (ec - eu)

    def grad(z, t):
        stats.clear()
        z = z.detach().requires_grad_(True)
        eps = eps_of(z, t)
        acp = acps[t]
        x0 = (z - (1 - acp) ** 0.5 * eps) / acp ** 0.5
        img = (vae.decode(x0 / sf).sample / 2 + 0.5).clamp(0, 1)
        img = F.interpolate(img, size=(224, 224), mode="bicubic", align_corners=False)
        logits = clf((img - mean) / std)
        loss = 0.1 * sum(stats) + F.cross_entropy(logits, target)
        return torch.autograd.grad(loss, z)[0]

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    lat = lat * sch.init_noise_sigma
    x0 = lat
    for t in ts[:-1]:
        lat = lat - grad(lat, t)
        with torch.no_grad():
            out = sch.step(eps_of(lat, t), t, lat)
        x0, lat = out.pred_original_sample, out.prev_sample
    with torch.no_grad():
        img = (vae.decode(x0 / sf).sample / 2 + 0.5).clamp(0, 1)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    save_file({"latents": x0.contiguous().cpu(), "images": img.contiguous().cpu()}, a.out)
    print(json.dumps({"total_s": t1 - t0, "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                      "torch": torch.__version__}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=["agree", "sd15", "fedcado"])
    ap.add_argument("--bin", default=str(ROOT / "target/release/diffuse-synth"))
    ap.add_argument("--work", type=Path, default=ROOT / "bench/out/diffuse-synth-gpu")
    ap.add_argument("--dtype", action="append", dest="dtypes", choices=["f32", "bf16", "f16"])
    ap.add_argument("--batch", action="append", dest="batches", type=int)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--short-steps", type=int, default=10)
    ap.add_argument("--guided-steps", type=int, default=10)
    ap.add_argument("--peer-sd15", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-guided", action="store_true", help=argparse.SUPPRESS)
    for k in ("model", "emb", "lat", "out", "noise", "clf"):
        ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer_sd15:
        a.dtype = (a.dtypes or ["f32"])[0]
        return peer_sd15(a)
    if a.peer_guided:
        return peer_guided(a)
    a.case = a.case or ["agree"]
    a.batches = a.batches or [1, 8]
    a.work.mkdir(parents=True, exist_ok=True)
    env = cuda_lib_env(a.work)
    probe = subprocess.run([a.bin, "--model", str(TD / "tiny-sd"), "--prompt-embeds", str(TD / "pipeline.safetensors"),
                            "--steps", "1", "--seed", "0", "--batch", "2", "--device", "cuda",
                            "-o", str(a.work / "probe.safetensors")], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        emit({"bench": "diffuse_synth_gpu", "skipped": probe.stderr.strip()[-500:], "exit": probe.returncode})
        return
    ok = True
    for case in a.case:
        if case == "agree":
            a.dtypes = a.dtypes or ["f32", "bf16", "f16"]
            ok &= run_agree(a, env)
            continue
        try:
            import diffusers  # noqa: F401
            import torch

            if not torch.cuda.is_available():
                raise ImportError("torch sees no CUDA device")
        except ImportError as e:
            emit({"bench": f"diffuse_synth_gpu_{case}", "skipped": f"no PyTorch/diffusers on CUDA here: {e}"})
            continue
        a.dtypes = a.dtypes or ["f32", "f16"]
        if case == "sd15":
            run_sd15(a, env)
        else:
            a.dtypes = [d for d in a.dtypes if d == "f32"] or ["f32"]  # the peer loop is f32
            run_fedcado(a, env)
    if not ok:
        sys.exit("FAIL: CUDA outside the tolerance of the CPU path (see the lines above)")


if __name__ == "__main__":
    main()
