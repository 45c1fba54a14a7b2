#!/usr/bin/env python3
"""FedDISC / Stable-unCLIP reference fixtures for diffuse-synth, made by diffusers' own code.

    .venv/bin/python testdata/gen/diffuse_synth_unclip_ref.py gen           # rewrite the files below
    .venv/bin/python testdata/gen/diffuse_synth_unclip_ref.py gen --check   # regenerate to a temp dir, compare

Writes into testdata/diffuse-synth/:

tiny-unclip/: a tiny random StableUnCLIPImg2ImgPipeline (save_pretrained): a UNet with
`class_embed_type: "projection"` (image embedding 8 + noise-level embedding 8 = 16), the
image_normalizer (random mean/std), the image_noising_scheduler (DDPM, squaredcos_cap_v2 as
SD-2.1-unclip), SD-2.1-unclip's PNDM v-prediction scheduler config, a VAE, and a tiny CLIP
vision encoder (the pipeline needs one; diffuse-synth never reads it). Every parameter is
re-initialised so none is zero.

unclip.safetensors: `prompt_embeds`, `negative_prompt_embeds` [2,5,12], `latents` [2,4,8,8],
`image_embeds` [2,8] (raw CLIP-space image embeddings), and per run `final.<key>` = the
final latents of StableUnCLIPImg2ImgPipeline(image_embeds=..., noise_level=..., output_type=
"latent"); unclip-noise-<key>.safetensors: `noise` [2,8], the noise-augmentation draw that the
pipeline's randn_tensor returned (fed in so the tool can reproduce it). Runs are listed in the
metadata (`runs`: scheduler, guidance, noise_level, key).

feddisc.safetensors: FedDISC's generation (MingzhaoYang/FedDISC sdmodel.py ImageGenerator, written
here from federated.md's description, not copied): uploads `centroids` [3,16] with `labels` [3]
(the fed-embed layout; two rows of class 1, one of class 0), a second client's uploads in
feddisc-client1.safetensors; for class 1, sample j uses the j-th class-1 upload re-noised to
level 200 (image half: normalise, DDPM add_noise, unnormalise; time half: (emb(200) + old)/2),
the global branch is the mean of client (j mod 2)'s class-1 uploads, unconditional class label
zeros, text branches [negative, prompt, prompt], e = e_u + 2 (e_img - e_u) + 2 (e_glo - e_u),
PNDM from the folder, 4 steps. Tensors: `noise` [2,8] (the re-noising draws), `final`.

Needs torch, diffusers and transformers (testdata/gen/requirements.txt).
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diffuse_synth_ref as base  # noqa: E402
from diffuse_synth_ref import NoiseFeed, reinit, restore  # noqa: E402

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableUnCLIPImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (  # noqa: E402
    StableUnCLIPImageNormalizer,
)
from diffusers.utils import logging as dlogging  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

dlogging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata" / "diffuse-synth"

# stabilityai/stable-diffusion-2-1-unclip scheduler/scheduler_config.json (PNDM, v-prediction)
SD21_UNCLIP = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# its image_noising_scheduler (DDPM, cosine betas)
NOISING = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
}
EMB = 8  # image embedding width; the UNet's class input is 2 * EMB
STEPS = 4
CLASSES = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}
# (scheduler, guidance, noise_level)
RUNS = [("pndm", 3.0, 100), ("ddim", 1.0, 0), ("dpmpp-2m", 2.0, 250)]


def tiny_unclip(gen):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=True,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * EMB,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    norm = StableUnCLIPImageNormalizer(embedding_dim=EMB)
    enc = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            image_size=8, patch_size=4, projection_dim=EMB,
        )
    )
    for m in (unet, vae, enc):
        reinit(m, gen)
    with torch.no_grad():
        norm.mean.copy_(0.3 * torch.randn(norm.mean.shape, generator=gen))
        norm.std.copy_(0.5 + torch.rand(norm.std.shape, generator=gen))
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
        image_encoder=enc,
        image_normalizer=norm,
        image_noising_scheduler=DDPMScheduler.from_config(NOISING),
        tokenizer=None,
        text_encoder=None,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD21_UNCLIP),
        vae=vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(d: Path, cls):
    sch = cls.from_pretrained(str(d), subfolder="scheduler")
    p = StableUnCLIPImg2ImgPipeline.from_pretrained(str(d), scheduler=sch, tokenizer=None, text_encoder=None)
    p.set_progress_bar_config(disable=True)
    return p


def gen_unclip(out: Path):
    gen = torch.Generator().manual_seed(2305)
    pipe = tiny_unclip(gen)
    d = out / "tiny-unclip"
    if d.exists():
        shutil.rmtree(d)
    pipe.save_pretrained(str(d), safe_serialization=True)
    b = 2
    emb = torch.randn((b, 5, 12), generator=gen)
    neg = torch.randn((b, 5, 12), generator=gen)
    lat = torch.randn((b, 4, 8, 8), generator=gen)
    img = torch.randn((b, EMB), generator=gen)
    t = {"prompt_embeds": emb, "negative_prompt_embeds": neg, "latents": lat, "image_embeds": img}
    runs = []
    mod = sys.modules[StableUnCLIPImg2ImgPipeline.__module__]
    for kind, guidance, level in RUNS:
        p = load(d, CLASSES[kind])
        noise = torch.randn((b, EMB), generator=gen)
        orig = getattr(mod, "randn_tensor", None)
        feed = NoiseFeed([noise])
        mod.randn_tensor = feed
        try:
            with torch.no_grad():
                res = p(
                    image_embeds=img.clone(),
                    prompt_embeds=emb,
                    negative_prompt_embeds=neg,
                    latents=lat.clone(),  # init_noise_sigma is 1 for these schedulers
                    num_inference_steps=STEPS,
                    guidance_scale=guidance,
                    noise_level=level,
                    output_type="latent",
                ).images
        finally:
            restore(mod, orig)
        assert feed.used == 1
        key = f"{kind}.g{guidance:g}.n{level}"
        t[f"final.{key}"] = res
        save_file({"noise": noise.contiguous()}, str(out / f"unclip-noise-{key}.safetensors"))
        runs.append({"scheduler": kind, "guidance": guidance, "noise_level": level, "key": key})
    save_file(
        {k: v.contiguous() for k, v in t.items()},
        str(out / "unclip.safetensors"),
        metadata={"runs": json.dumps(runs), "steps": str(STEPS)},
    )
    total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    print(f"tiny-unclip: {total} bytes; {len(runs)} runs")


def feddisc_renoise(p, v, level, noise):
    """FedDISC's re-noising of an uploaded [N, 2E] feature: the image half is noised at
    `level` as diffusers' noise_image_embeddings does, the time half becomes the mean of
    the old one and the sinusoidal embedding of `level`."""
    e = v.shape[1] // 2
    img, tpart = v[:, :e], v[:, e:]
    lv = torch.tensor([level] * v.shape[0])
    x = p.image_normalizer.scale(img)
    x = p.image_noising_scheduler.add_noise(x, timesteps=lv, noise=noise)
    x = p.image_normalizer.unscale(x)
    temb = get_timestep_embedding(lv, e, flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([x, (temb + tpart) / 2], 1)


def client_upload(p, gen, labels):
    """A client's upload as FedDISC makes it: image embeddings noised to level 500 with the
    level's embedding appended (diffusers' noise_image_embeddings), in fed-embed's layout."""
    n = len(labels)
    raw = torch.randn((n, EMB), generator=gen)
    noise = torch.randn((n, EMB), generator=gen)
    with torch.no_grad():
        feats = p.noise_image_embeddings(raw, 500, noise=noise)
    return {"centroids": feats.contiguous(), "labels": torch.tensor(labels, dtype=torch.int64)}


def gen_feddisc(out: Path):
    gen = torch.Generator().manual_seed(4063)
    d = out / "tiny-unclip"
    p = load(d, PNDMScheduler)
    ref = load_file(str(out / "unclip.safetensors"))
    c0 = client_upload(p, gen, [1, 0, 1])
    c1 = client_upload(p, gen, [1, 1, 0])
    save_file(c1, str(out / "feddisc-client1.safetensors"))
    cls, level, s, b = 1, 200, 2.0, 2
    mine = c0["centroids"][c0["labels"] == cls]  # [2, 16]: sample j uses row j
    glob = [c["centroids"][c["labels"] == cls].mean(0) for c in (c0, c1)]
    g = torch.stack([glob[j % 2] for j in range(b)])
    noise = torch.randn((b, EMB), generator=gen)
    emb, neg, lat = ref["prompt_embeds"], ref["negative_prompt_embeds"], ref["latents"]
    with torch.no_grad():
        v = feddisc_renoise(p, mine, level, noise)
        labels = torch.cat([torch.zeros_like(v), v, g])
        ehs = torch.cat([neg, emb, emb])
        p.scheduler.set_timesteps(STEPS)
        x = lat * p.scheduler.init_noise_sigma
        for t in p.scheduler.timesteps:
            inp = p.scheduler.scale_model_input(torch.cat([x] * 3), t)
            e = p.unet(inp, t, encoder_hidden_states=ehs, class_labels=labels).sample
            eu, ei, eg = e.chunk(3)
            x = p.scheduler.step(eu + s * (ei - eu) + s * (eg - eu), t, x).prev_sample
    save_file(
        dict(c0, noise=noise.contiguous(), final=x.contiguous()),
        str(out / "feddisc.safetensors"),
        metadata={"class": str(cls), "noise_level": str(level), "guidance": str(s), "steps": str(STEPS)},
    )


if __name__ == "__main__":
    base.cli([gen_unclip, gen_feddisc])
