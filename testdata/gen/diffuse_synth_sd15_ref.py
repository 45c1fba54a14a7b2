"""A Stable Diffusion 1.5-shaped folder with random weights, for diffuse-synth's real-size
benchmark and exactness check (nothing it writes is checked in: the folder is 3.4 GB).

The UNet, VAE and scheduler configs are the published ones of
runwayml/stable-diffusion-v1-5 (UNet 860 M parameters, VAE 84 M, PNDM scheduler). Weights
are drawn as testdata/gen/diffuse_synth_ref.py's `reinit` draws them (seeded): weights
N(0, 1/fan_in), biases N(0, 0.05^2), norm scales 1 + N(0, 0.1^2), so activations stay O(1)
through every block and a 50-step run stays finite.

    python testdata/gen/diffuse_synth_sd15_ref.py gen DIR           # DIR/model, DIR/inputs.safetensors
    python testdata/gen/diffuse_synth_sd15_ref.py check DIR --steps 5 [--bin target/release/diffuse-synth]

`check` runs diffuse-synth and diffusers' StableDiffusionPipeline (DDIM, CFG 7.5,
512x512, batch 1, same latents and embeddings, same thread count) and fails unless the
final latents agree within 1e-4 of their scale (max |ftk - diffusers| <= 1e-4 max |latents|).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SEED = 15
TOKENS = 77
UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SCHED = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def reinit(module, gen):
    """diffuse_synth_ref.reinit, imported here so that a run without torch
    (the CLI's --help) does not load diffusers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import diffuse_synth_ref

    diffuse_synth_ref.reinit(module, gen)


def gen(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET)
    reinit(unet, g)
    vae = AutoencoderKL(**VAE)
    reinit(vae, g)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=PNDMScheduler.from_config(SCHED),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out / "model"), safe_serialization=True)
    save_file({
        "prompt_embeds": torch.randn((1, TOKENS, UNET["cross_attention_dim"]), generator=g),
        "negative_prompt_embeds": torch.randn((1, TOKENS, UNET["cross_attention_dim"]), generator=g),
        "latents": torch.randn((1, 4, 64, 64), generator=g),
    }, str(out / "inputs.safetensors"))
    n = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in vae.parameters())
    print(json.dumps({"kind": "sd15_folder", "path": str(out / "model"), "parameters": n}))


def diffusers_latents(model: Path, inputs: Path, steps: int, threads: int) -> "torch.Tensor":
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    p = StableDiffusionPipeline.from_pretrained(
        str(model), scheduler=DDIMScheduler.from_pretrained(str(model), subfolder="scheduler"),
        safety_checker=None, text_encoder=None, tokenizer=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    t = load_file(str(inputs))
    with torch.inference_mode():
        return p(prompt_embeds=t["prompt_embeds"], negative_prompt_embeds=t["negative_prompt_embeds"],
                 latents=t["latents"].clone(), num_inference_steps=steps, guidance_scale=7.5,
                 output_type="latent").images


def check(d: Path, steps: int, binary: Path, threads: int) -> int:
    import numpy as np
    from safetensors.numpy import load_file

    model, inputs = d / "model", d / "inputs.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ftk.safetensors"
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), FTK_NO_PROGRESS="1")
        subprocess.run([str(binary), "--model", str(model), "--scheduler", "ddim", "--steps", str(steps),
                        "--guidance-scale", "7.5", "--prompt-embeds", str(inputs), "--latents", str(inputs),
                        "-o", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
        ftk = load_file(str(out))["latents"]
    ref = diffusers_latents(model, inputs, steps, threads).numpy()
    diff = float(np.abs(ftk - ref).max())
    scale = float(np.abs(ref).max())
    ok = np.isfinite(diff) and diff <= 1e-4 * scale
    print(json.dumps({"kind": "sd15_check", "steps": steps, "max_abs_diff": diff, "max_abs_latent": scale,
                      "tolerance": 1e-4 * scale, "ok": bool(ok)}))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["gen", "check"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bin", type=Path, default=Path(__file__).resolve().parents[2] / "target/release/diffuse-synth")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    if a.cmd == "gen":
        gen(a.dir)
        return 0
    return check(a.dir, a.steps, a.bin, a.threads)


if __name__ == "__main__":
    sys.exit(main())
