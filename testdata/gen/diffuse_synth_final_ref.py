"""Reference for `diffuse-synth --final x0`: the sampling loop of FedCADO's and
FedDEO's generate_images.py, which runs DDPM over timesteps[:-1] and keeps the
last step's pred_original_sample instead of the final sample.

On the checked-in tiny pipeline (testdata/diffuse-synth/tiny-sd, pipeline.safetensors):
DDPM from the folder as StableDiffusionPipeline configures it, PIPE_STEPS steps, CFG 3,
both samples in one batch, the scheduler's noise fed from a fixed tensor. Writes
final-x0.safetensors: `x0` [2,4,8,8] (the reference) and `noise` [draws,2,4,8,8] (the
draws, for `--step-noise`).

Run: .venv/bin/python testdata/gen/diffuse_synth_final_ref.py gen [--check]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import diffuse_synth_ref as base  # noqa: E402
from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

GUIDANCE = 3.0


def gen(out: Path):
    d = base.OUT / "tiny-sd"
    ref = load_file(str(base.OUT / "pipeline.safetensors"))
    emb, neg, lat = ref["prompt_embeds"], ref["negative_prompt_embeds"], ref["latents"]
    b = lat.shape[0]
    p = StableDiffusionPipeline.from_pretrained(
        str(d), scheduler=DDPMScheduler.from_pretrained(str(d), subfolder="scheduler"),
        safety_checker=None, text_encoder=None, tokenizer=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    s = p.scheduler
    s.set_timesteps(base.PIPE_STEPS)
    gen_ = torch.Generator().manual_seed(4321)
    noise = torch.randn((len(s.timesteps), b) + tuple(lat.shape[1:]), generator=gen_)
    mod = sys.modules[DDPMScheduler.__module__]
    orig = getattr(mod, "randn_tensor", None)
    feed = base.NoiseFeed(noise)
    mod.randn_tensor = feed
    try:
        with torch.no_grad():
            x = lat * s.init_noise_sigma
            x0 = None
            for t in s.timesteps[:-1]:
                e = p.unet(torch.cat([s.scale_model_input(x, t)] * 2), t,
                           encoder_hidden_states=torch.cat([neg, emb])).sample
                eu, ec = e.chunk(2)
                eps = eu + GUIDANCE * (ec - eu)
                o = s.step(eps, t, x)
                x, x0 = o.prev_sample, o.pred_original_sample
    finally:
        base.restore(mod, orig)
    save_file({"x0": x0.contiguous(), "noise": noise.contiguous()},
              str(out / "final-x0.safetensors"),
              metadata={"scheduler": "ddpm", "steps": str(base.PIPE_STEPS), "guidance": "3"})


if __name__ == "__main__":
    base.cli([gen])
