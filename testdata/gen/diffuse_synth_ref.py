#!/usr/bin/env python3
"""Reference fixtures for diffuse-synth, produced by diffusers' own code.

    .venv/bin/python testdata/gen/diffuse_synth_ref.py gen           # rewrite testdata/diffuse-synth/
    .venv/bin/python testdata/gen/diffuse_synth_ref.py gen --check   # regenerate to a temp dir, compare

schedulers.safetensors: one case per (scheduler, config, steps). Each case `c<k>` holds
`timesteps` (f64), `sigmas` (f32, sigma schedulers only), `sample0`, `model_outputs` [S,..],
`noise` [S,..] (fed to diffusers' randn_tensor in step order), `scaled` [S,..] (the
scale_model_input output), `outputs` [S,..] (step()'s prev_sample). The JSON in the
file's metadata lists the cases: scheduler name, the scheduler_config dict given to
`from_config`, steps, eta, init_noise_sigma.

tiny-sd/: a tiny random StableDiffusionPipeline (save_pretrained), every parameter
re-initialised so none is zero; pipeline.safetensors: prompt_embeds, negative_prompt_embeds,
latents, and the final latents (and decoded images) of StableDiffusionPipeline(output_type=
"latent") per scheduler and guidance scale; noise-<run>.safetensors: the draws the stochastic
schedulers took (`noise`, in draw order); multi.safetensors: two weighted conditions through a
plain diffusers UNet + DDIM loop; classifier.{json,safetensors} + fedcado.safetensors: FedCADO's
loss and gradient w.r.t. the latents in PyTorch; describe.safetensors: three FedDEO SGD steps.

Text (`--prompt`): tiny-sd/ also gets a tiny random CLIPTextModel (quick_gelu) and a CLIPTokenizer
as transformers 5 saves them (tokenizer.json); tiny-clip-sd2/ is an SD 2.x-style pair (gelu,
`text_model.`-prefixed weights, legacy vocab.json + merges.txt with pad "!" in
special_tokens_map.json, use_attention_mask); clip-vocab/{sd15,sd2}/ are the real CLIP BPE
(openai's bpe_simple_vocab_16e6, shipped by the open-clip-torch wheel) cut down to the
tokens and merges the test prompts can reach, keeping the real ids. text.safetensors: the
token ids transformers' CLIPTokenizer gives for PROMPTS (with the FULL real vocab for
clip-vocab/) and CLIPTextModel's embeddings; prompt.safetensors: final latents of
StableDiffusionPipeline(prompt=..., negative_prompt=...) on tiny-sd.

Needs torch and diffusers (testdata/gen/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils import logging as dlogging  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

dlogging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata" / "diffuse-synth"

CLASSES = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
}
SIGMA_KINDS = {"euler", "euler-ancestral", "dpmpp-2m"}

# Stable Diffusion 1.5's scheduler/scheduler_config.json, verbatim.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# Stable Diffusion 2.1's (768, v-prediction).
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SHAPE = (1, 2, 2, 3)


class NoiseFeed:
    """Replaces randn_tensor inside a scheduler module with a list of fixed tensors."""

    def __init__(self, noise):
        self.noise = noise
        self.used = 0

    def __call__(self, shape, **kw):
        n = self.noise[self.used]
        self.used += 1
        assert tuple(n.shape) == tuple(shape), (n.shape, shape)
        return n.clone()


def scheduler_cases():
    cases = []
    betas = [
        {"beta_schedule": "linear"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
    ]
    for kind in CLASSES:
        for b in betas:
            for spacing in ["leading", "trailing", "linspace"]:
                for pred in ["epsilon", "v_prediction"]:
                    cfg = dict(b, timestep_spacing=spacing, prediction_type=pred)
                    cases.append((kind, cfg, 7, 0.0))
        # defaults only (each class's own defaults)
        cases.append((kind, {}, 10, 0.0))
        # SD 1.5 / 2.1 configs as files: keys the class lacks fall back to its defaults
        cases.append((kind, dict(SD15), 20, 0.0))
        cases.append((kind, dict(SD21), 9, 0.0))
        # steps_offset and the trailing arange with a non-integer ratio
        cases.append((kind, {"steps_offset": 1, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 3, 0.0))
        cases.append((kind, {"timestep_spacing": "trailing"}, 3, 0.0))
        cases.append((kind, {"timestep_spacing": "trailing", "num_train_timesteps": 100}, 6, 0.0))
        cases.append((kind, {"trained_betas": list(np.linspace(0.001, 0.03, 50).round(6)), "num_train_timesteps": 50}, 5, 0.0))
    for kind in ["euler", "dpmpp-2m"]:
        for b in betas:
            for spacing in ["leading", "trailing", "linspace"]:
                for pred in ["epsilon", "v_prediction"]:
                    cfg = dict(b, timestep_spacing=spacing, prediction_type=pred, use_karras_sigmas=True)
                    cases.append((kind, cfg, 8, 0.0))
        cases.append((kind, dict(SD15, use_karras_sigmas=True), 25, 0.0))
        cases.append((kind, dict(SD15, final_sigmas_type="sigma_min"), 6, 0.0))
    cases.append(("euler", dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), 6, 0.0))
    cases.append(("dpmpp-2m", dict(SD15, solver_order=1), 6, 0.0))
    cases.append(("dpmpp-2m", dict(SD15, solver_type="heun"), 6, 0.0))
    cases.append(("dpmpp-2m", dict(SD15, lower_order_final=False), 6, 0.0))
    cases.append(("dpmpp-2m", dict(SD15, lower_order_final=False, final_sigmas_type="sigma_min"), 16, 0.0))
    cases.append(("dpmpp-2m", dict(SD15, euler_at_final=True, final_sigmas_type="sigma_min"), 16, 0.0))
    cases.append(("dpmpp-2m", dict(SD15, lambda_min_clipped=-5.1), 6, 0.0))
    cases.append(("dpmpp-2m", dict(SD15, algorithm_type="dpmsolver"), 6, 0.0))
    cases.append(("dpmpp-2m", dict(SD15, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), 6, 0.0))
    cases.append(("ddim", dict(SD15, set_alpha_to_one=True), 6, 0.0))
    cases.append(("ddim", dict(SD15), 6, 0.5))
    cases.append(("ddim", dict(SD15), 6, 1.0))
    cases.append(("ddim", {"clip_sample": True, "clip_sample_range": 0.5}, 6, 0.0))
    cases.append(("ddpm", {"clip_sample": True, "clip_sample_range": 0.5}, 6, 0.0))
    cases.append(("ddpm", {"variance_type": "fixed_large"}, 6, 0.0))
    cases.append(("pndm", dict(SD15, skip_prk_steps=False), 10, 0.0))
    cases.append(("pndm", dict(SD15, skip_prk_steps=False, set_alpha_to_one=True), 6, 0.0))
    cases.append(("pndm", {"skip_prk_steps": False, "timestep_spacing": "trailing"}, 5, 0.0))
    cases.append(("pndm", {"skip_prk_steps": False, "timestep_spacing": "linspace", "prediction_type": "v_prediction"}, 5, 0.0))
    return cases


def restore(mod, orig):
    if orig is None:
        del mod.randn_tensor
    else:
        mod.randn_tensor = orig


def run_case(kind, cfg, steps, eta, gen):
    cls = CLASSES[kind]
    sched = cls.from_config(cfg)
    sched.set_timesteps(steps)
    ts = sched.timesteps
    n = len(ts)
    sample0 = torch.randn(SHAPE, generator=gen)
    mos = torch.randn((n,) + SHAPE, generator=gen)
    noise = torch.randn((n,) + SHAPE, generator=gen)
    feed = NoiseFeed(noise)
    mod = sys.modules[cls.__module__]
    orig = getattr(mod, "randn_tensor", None)
    mod.randn_tensor = feed
    try:
        x = sample0 * sched.init_noise_sigma
        scaled, outs = [], []
        for i, t in enumerate(ts):
            xi = sched.scale_model_input(x, t)
            scaled.append(xi)
            kw = {"eta": eta} if kind == "ddim" else {}
            x = sched.step(mos[i], t, x, **kw, return_dict=False)[0]
            outs.append(x)
    finally:
        restore(mod, orig)
    # Noise is consumed in step order; the tool draws one per step whether or not it is
    # used, so store the per-step tensor a step actually consumed at its step index.
    used = torch.zeros_like(noise)
    # Re-run to learn which steps drew noise.
    drawn = []

    class Probe(NoiseFeed):
        def __call__(self, shape, **kw):
            drawn.append(self.step)
            return super().__call__(shape, **kw)

    sched2 = cls.from_config(cfg)
    sched2.set_timesteps(steps)
    probe = Probe(noise)
    mod.randn_tensor = probe
    try:
        x = sample0 * sched2.init_noise_sigma
        for i, t in enumerate(sched2.timesteps):
            probe.step = i
            xi = sched2.scale_model_input(x, t)
            kw = {"eta": eta} if kind == "ddim" else {}
            x = sched2.step(mos[i], t, x, **kw, return_dict=False)[0]
    finally:
        restore(mod, orig)
    for j, i in enumerate(drawn):
        used[i] = noise[j]
    tensors = {
        "timesteps": ts.to(torch.float64),
        "sample0": sample0,
        "model_outputs": mos,
        "noise": used,
        "scaled": torch.stack(scaled),
        "outputs": torch.stack(outs),
    }
    if kind in SIGMA_KINDS:
        tensors["sigmas"] = sched.sigmas.to(torch.float32)
    meta = {
        "scheduler": kind,
        "config": cfg,
        "steps": steps,
        "eta": eta,
        "init_noise_sigma": float(sched2.init_noise_sigma),
        "noise_steps": drawn,
    }
    return tensors, meta


def gen_schedulers(out: Path):
    gen = torch.Generator().manual_seed(20240807)
    tensors, metas = {}, []
    for k, (kind, cfg, steps, eta) in enumerate(scheduler_cases()):
        try:
            t, m = run_case(kind, cfg, steps, eta, gen)
        except Exception as e:  # diffusers refuses this combination: the tool must too
            t, m = {}, {"scheduler": kind, "config": cfg, "steps": steps, "eta": eta, "error": str(e)[:200]}
        for name, v in t.items():
            tensors[f"c{k}.{name}"] = v.contiguous()
        metas.append(m)
    save_file(tensors, str(out / "schedulers.safetensors"), metadata={"cases": json.dumps(metas)})
    print(f"schedulers: {len(metas)} cases")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["gen"])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--only", choices=["schedulers", "pipeline", "text"], default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp()) if a.check else OUT
    out.mkdir(parents=True, exist_ok=True)
    if a.only in (None, "schedulers"):
        gen_schedulers(out)
    if a.only in (None, "pipeline"):
        gen_pipeline(out)
        gen_fedcado(out)
        gen_describe(out)
    if a.only in (None, "pipeline", "text"):
        gen_text(out)
    if a.check:
        bad = compare(out)
        shutil.rmtree(out)
        sys.exit(1 if bad else 0)


def cli(gens):
    """The command line every diffuse-synth generator shares: `gen` writes
    testdata/diffuse-synth/ with each of `gens`; `gen --check` writes to a temp dir and
    compares with what is checked in (exit 1 on a difference)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["gen"])
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp()) if a.check else OUT
    out.mkdir(parents=True, exist_ok=True)
    for g in gens:
        g(out)
    if a.check:
        bad = compare(out)
        shutil.rmtree(out)
        sys.exit(1 if bad else 0)


def compare(tmp: Path) -> int:
    from safetensors.torch import load_file

    bad = 0
    for p in sorted(tmp.rglob("*")):
        if p.is_dir():
            continue
        q = OUT / p.relative_to(tmp)
        if not q.exists():
            print(f"missing: {q}")
            bad += 1
            continue
        if p.suffix == ".safetensors":
            a, b = load_file(str(p)), load_file(str(q))
            if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
                print(f"differs: {q}")
                bad += 1
        elif p.read_bytes() != q.read_bytes():
            print(f"differs: {q}")
            bad += 1
    print("ok" if not bad else f"{bad} files differ")
    return bad


PIPE_STEPS = 4
PIPE_GUIDANCE = 3.0


def bn_stat_terms(modules) -> list:
    """FedCADO's BatchNorm-statistics loss: a hook on every BatchNorm2d in `modules`
    appends ||running_var - var||_2 + ||running_mean - mean||_2 of that layer's input
    (biased batch variance) to the returned list on each forward; the loss is its sum.
    Shared by the fixtures and the benchmarks so all of them run the same loss."""
    stats = []

    def hook(mod, inp, outp):
        x = inp[0]
        mu = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(1, unbiased=False)
        stats.append(torch.norm(mod.running_var - var, 2) + torch.norm(mod.running_mean - mu, 2))

    for m in modules:
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(hook)
    return stats


def reinit(module, gen):
    """Every parameter redrawn so none is zero: weights N(0, 1/fan_in), biases
    N(0, 0.05^2), norm scales 1 + N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            # a parameter left at its (zero) init would hide a missing weight; a
            # single exact 0.0 drawn among millions of values is fine
            assert (p != 0).any(), name


def tiny_pipeline(gen):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    reinit(unet, gen)
    reinit(vae, gen)
    sched = PNDMScheduler.from_config(SD15)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen_pipeline(out: Path):
    gen = torch.Generator().manual_seed(1234)
    pipe = tiny_pipeline(gen)
    d = out / "tiny-sd"
    if d.exists():
        shutil.rmtree(d)
    pipe.save_pretrained(str(d), safe_serialization=True)
    # Reload exactly as a user would, so the checked-in folder is what we test.
    from diffusers import StableDiffusionPipeline

    b = 2
    emb = torch.randn((b, 5, 24), generator=gen)
    neg = torch.randn((b, 5, 24), generator=gen)
    lat = torch.randn((b, 4, 8, 8), generator=gen)
    t = {"prompt_embeds": emb, "negative_prompt_embeds": neg, "latents": lat}
    runs = []
    for kind, cls in CLASSES.items():
        for guidance in [PIPE_GUIDANCE, 1.0]:
            sch = cls.from_pretrained(str(d), subfolder="scheduler")
            p = StableDiffusionPipeline.from_pretrained(
                str(d), scheduler=sch, safety_checker=None, text_encoder=None, tokenizer=None,
                feature_extractor=None, image_encoder=None, requires_safety_checker=False
            )
            p.set_progress_bar_config(disable=True)
            p.scheduler.set_timesteps(PIPE_STEPS)
            n = len(p.scheduler.timesteps)
            noise = torch.randn((n, b, 4, 8, 8), generator=gen)
            mod = sys.modules[cls.__module__]
            orig = getattr(mod, "randn_tensor", None)
            feed = NoiseFeed(noise)
            mod.randn_tensor = feed
            try:
                with torch.no_grad():
                    res = p(
                        prompt_embeds=emb,
                        negative_prompt_embeds=neg,
                        latents=lat.clone(),
                        num_inference_steps=PIPE_STEPS,
                        guidance_scale=guidance,
                        output_type="latent",
                    ).images
                    img = p.vae.decode(res / p.vae.config.scaling_factor, return_dict=False)[0]
                    img = (img / 2 + 0.5).clamp(0, 1)
            finally:
                restore(mod, orig)
            key = f"{kind}.g{guidance:g}"
            t[f"final.{key}"] = res
            t[f"images.{key}"] = img
            # noise[k] is what the k-th randn_tensor call inside the scheduler returned
            if feed.used:
                save_file({"noise": noise[: feed.used].contiguous()}, str(out / f"noise-{key}.safetensors"))
            runs.append({"scheduler": kind, "guidance": guidance, "key": key})
    # Several weighted conditions, e = e_u + sum_i w_i (e_i - e_u), as a plain loop over
    # diffusers' UNet and DDIM scheduler (the pipeline has no multi-condition mode).
    emb2 = torch.randn((b, 5, 24), generator=gen)
    sch = DDIMScheduler.from_pretrained(str(d), subfolder="scheduler")
    p = StableDiffusionPipeline.from_pretrained(
        str(d), scheduler=sch, safety_checker=None, text_encoder=None, tokenizer=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False
    )
    p.scheduler.set_timesteps(PIPE_STEPS)
    x = lat * p.scheduler.init_noise_sigma
    w1, w2 = 2.0, 1.5
    with torch.no_grad():
        for step_t in p.scheduler.timesteps:
            inp = p.scheduler.scale_model_input(torch.cat([x] * 3), step_t)
            e = p.unet(inp, step_t, encoder_hidden_states=torch.cat([neg, emb, emb2])).sample
            eu, e1, e2 = e.chunk(3)
            eps = eu + w1 * (e1 - eu) + w2 * (e2 - eu)
            x = p.scheduler.step(eps, step_t, x).prev_sample
    save_file(
        {"prompt_embeds": emb2.contiguous(), "final": x.contiguous()},
        str(out / "multi.safetensors"),
        metadata={"weights": json.dumps([w1, w2]), "scheduler": "ddim", "steps": str(PIPE_STEPS)},
    )
    save_file(
        {k: v.contiguous() for k, v in t.items()},
        str(out / "pipeline.safetensors"),
        metadata={"runs": json.dumps(runs), "steps": str(PIPE_STEPS)},
    )
    total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    print(f"tiny-sd: {total} bytes; pipeline: {len(runs)} runs")


CLF_ARCH = {
    "layers": [
        {"type": "conv", "name": "conv1", "in": 3, "out": 4, "kernel": 3, "stride": 1, "padding": 1, "bias": False},
        {"type": "bn", "name": "bn1", "eps": 1e-5},
        {"type": "relu"},
        {"type": "conv", "name": "conv2", "in": 4, "out": 6, "kernel": 3, "stride": 2, "padding": 1, "bias": True},
        {"type": "bn", "name": "bn2", "eps": 1e-5},
        {"type": "relu"},
        {"type": "avgpool"},
        {"type": "linear", "name": "fc", "in": 6, "out": 3},
    ]
}
CLF_SIZE = 12
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, 2, 1, bias=True)
        self.bn2 = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def gen_fedcado(out: Path):
    """FedCADO's loss and its gradient w.r.t. the latents, in PyTorch, on the tiny
    pipeline: DDPM from the folder, CFG 3, 4 steps, first timestep, class 1."""
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline

    gen = torch.Generator().manual_seed(99)
    clf = TinyClassifier()
    reinit(clf, gen)
    with torch.no_grad():
        for bn in (clf.bn1, clf.bn2):
            bn.running_mean.copy_(0.2 * torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=gen))
    clf.eval()
    sd = {k: v.contiguous() for k, v in clf.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(out / "classifier.safetensors"))
    (out / "classifier.json").write_text(json.dumps(CLF_ARCH, indent=1) + "\n")

    d = out / "tiny-sd"
    sch = DDPMScheduler.from_pretrained(str(d), subfolder="scheduler")
    p = StableDiffusionPipeline.from_pretrained(
        str(d), scheduler=sch, safety_checker=None, text_encoder=None, tokenizer=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False
    )
    p.scheduler.set_timesteps(PIPE_STEPS)
    t = p.scheduler.timesteps[0]
    from safetensors.torch import load_file

    ref = load_file(str(out / "pipeline.safetensors"))
    emb, neg, lat = ref["prompt_embeds"][:1], ref["negative_prompt_embeds"][:1], ref["latents"][:1]
    stats = bn_stat_terms([clf.bn1, clf.bn2])
    res = {}
    for with_ce in (True, False):
        stats.clear()
        z = (lat * p.scheduler.init_noise_sigma).clone().requires_grad_(True)
        e = p.unet(torch.cat([z] * 2), t, encoder_hidden_states=torch.cat([neg, emb])).sample
        eu, ec = e.chunk(2)
        eps = eu + 3.0 * (ec - eu)
        x0 = p.scheduler.step(eps, t, z, generator=torch.Generator().manual_seed(0)).pred_original_sample
        img = (p.vae.decode(x0 / p.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        img = F.interpolate(img, size=(CLF_SIZE, CLF_SIZE), mode="bicubic", align_corners=False)
        m = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        s = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        logits = clf((img - m) / s)
        loss = 0.1 * sum(stats)
        if with_ce:
            loss = loss + F.cross_entropy(logits, torch.tensor([1]))
        loss.backward()
        tag = "ce_bn" if with_ce else "bn"
        res[f"loss.{tag}"] = loss.detach().reshape(1)
        res[f"grad.{tag}"] = z.grad.detach()
    save_file({k: v.contiguous() for k, v in res.items()}, str(out / "fedcado.safetensors"),
              metadata={"class": "1", "size": str(CLF_SIZE), "bn_weight": "0.1", "guidance": "3",
                        "scheduler": "ddpm", "steps": str(PIPE_STEPS), "step": "0"})


def gen_describe(out: Path):
    """FedDEO description learning in PyTorch on the tiny pipeline: 3 SGD steps at lr 10
    with fixed timesteps and noise (fed to `diffuse-synth describe --train-noise`)."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(7)
    d = out / "tiny-sd"
    unet = UNet2DConditionModel.from_pretrained(str(d / "unet"))
    vae = AutoencoderKL.from_pretrained(str(d / "vae"))
    sched = DDPMScheduler.from_pretrained(str(d), subfolder="scheduler")
    ref = load_file(str(out / "pipeline.safetensors"))
    steps, lr = 3, 10.0
    images = torch.rand((steps, 3, 16, 16), generator=gen)
    timesteps = torch.randint(0, 1000, (steps,), generator=gen)
    lnoise = torch.randn((steps, 4, 8, 8), generator=gen)
    noise = torch.randn((steps, 4, 8, 8), generator=gen)
    init = ref["prompt_embeds"][:1].clone()
    desc = init.clone().requires_grad_(True)
    m = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    losses = []
    for k in range(steps):
        x = (images[k : k + 1] - m) / s
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z0 = (dist.mean + dist.std * lnoise[k : k + 1]) * vae.config.scaling_factor
        zt = sched.add_noise(z0, noise[k : k + 1], timesteps[k : k + 1])
        pred = unet(zt, timesteps[k], encoder_hidden_states=desc).sample
        loss = F.mse_loss(pred, noise[k : k + 1])
        loss.backward()
        with torch.no_grad():
            desc -= lr * desc.grad
        desc.grad = None
        losses.append(loss.item())
    save_file(
        {
            "images": images,
            "prompt_embeds": init.contiguous(),
            "timesteps": timesteps,
            "latent_noise": lnoise,
            "noise": noise,
            "final": desc.detach().contiguous(),
            "losses": torch.tensor(losses),
        },
        str(out / "describe.safetensors"),
        metadata={"lr": str(lr), "steps": str(steps)},
    )


# ---------------------------------------------------------------- text encoder (--prompt)

PROMPTS = [
    "a photo of a cat",
    "A Photo OF a CAT!!!",
    "  leading and   trailing\twhitespace\n ",
    "don't you're we've I'm they'll he'd it's DON'T",
    "Rock'n'roll isn't dead, it\u2019s ALIVE",
    "numbers: 3.14159, 2024-09-01, 1000000 and 42nd",
    "caf\u00e9 na\u00efve Z\u00fcrich \u2014 \u6771\u4eac \U0001F600 \u00f1",
    "decomposed e\u0301 and \u0130stanbul, \u03a3\u038a\u03a3\u03a5\u03a6\u039f\u03a3",
    "hello<|endoftext|>world <|startoftext|> and <|ENDOFTEXT|>",
    "a_b-c/d\\e @#$%^&*() [x]{y} <z> ~`+=|",
    "spaces:\u00a0nbsp\u3000ideo\u2003em\u0085nel\u200bzwsp\ufeffbom\u180emvs\u2028ls",
    "",
    "wow!! hi! ! !!",
    " ".join(f"word{i}" for i in range(40)),
    "supercalifragilisticexpialidocious " * 3,
]
TEXT_MAX = 77


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet), in CLIP's
    vocab order: the printable bytes first, then the rest."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def real_clip_bpe():
    """The real CLIP vocab (openai/clip-vit-large-patch14's vocab.json ids) and merges, from
    the bpe_simple_vocab_16e6.txt.gz that the open-clip-torch wheel ships (located, not imported)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        sys.exit("needs open-clip-torch (pip install --no-deps open-clip-torch): its CLIP BPE file")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    alpha = bytes_to_unicode()
    vocab = alpha + [c + "</w>" for c in alpha] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def added(c):
    return {"__type": "AddedToken", "content": c, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_legacy_tokenizer(d: Path, vocab: dict, merges: list, pad: str):
    """The files of an SD 1.x/2.x `tokenizer/` folder as published (vocab.json, merges.txt,
    tokenizer_config.json with AddedToken dicts, special_tokens_map.json naming the pad)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    cfg = {"add_prefix_space": False, "bos_token": added("<|startoftext|>"), "do_lower_case": True,
           "eos_token": added("<|endoftext|>"), "errors": "replace", "model_max_length": TEXT_MAX,
           "pad_token": "<|endoftext|>", "special_tokens_map_file": "./special_tokens_map.json",
           "tokenizer_class": "CLIPTokenizer", "unk_token": added("<|endoftext|>")}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sm = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"), "pad_token": pad,
          "unk_token": added("<|endoftext|>")}
    (d / "special_tokens_map.json").write_text(json.dumps(sm, indent=2) + "\n")


def token_ids(tok, prompts):
    enc = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def reachable(tok, vocab, merges):
    """Tokens and merges BPE can touch on PROMPTS: every symbol BPE forms is a substring of a
    pre-tokenised word (the last one with `</w>`), so keeping those tokens and the merges among
    them, in their order and with their ids, gives the same ids on these prompts."""
    bt = tok.backend_tokenizer
    cand = set()
    for p in PROMPTS:
        for w, _ in bt.pre_tokenizer.pre_tokenize_str(bt.normalizer.normalize_str(p)):
            n = len(w)
            for i in range(n):
                for j in range(i + 1, n + 1):
                    cand.add(w[i:j] + ("</w>" if j == n else ""))
    keep = {t for t in vocab if t in cand} | {"<|startoftext|>", "<|endoftext|>", "!"}
    kept_merges = [m for m in merges if m[0] in keep and m[1] in keep and m[0] + m[1] in keep]
    return keep, kept_merges


def reinit_text(model, gen):
    """As reinit(), embeddings included (N(0, 1/dim) so the first layer norm sees O(1) inputs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            # a parameter left at its (zero) init would hide a missing weight; a
            # single exact 0.0 drawn among millions of values is fine
            assert (p != 0).any(), name


def encode(te, ids, mask, clip_skip=None):
    """diffusers' encode_prompt: last_hidden_state, or hidden_states[-(clip_skip+1)] through the
    final layer norm; the attention mask only when the config asks for it."""
    m = mask if getattr(te.config, "use_attention_mask", False) else None
    with torch.no_grad():
        if clip_skip is None:
            return te(ids, attention_mask=m)[0]
        o = te(ids, attention_mask=m, output_hidden_states=True)
        hs = o.hidden_states  # the embeddings, then each layer's output
        assert len(hs) == te.config.num_hidden_layers + 1
        assert torch.equal(te.final_layer_norm(hs[-1]), o.last_hidden_state)
        return te.final_layer_norm(hs[-(clip_skip + 1)])


def gen_text(out: Path):
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as tlogging

    tlogging.set_verbosity_error()
    gen = torch.Generator().manual_seed(4242)
    vocab, merges = real_clip_bpe()
    t = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---- the real vocab: ids with the full files, then the cut-down copy checked in
        full = {}
        for name, pad in (("sd15", "<|endoftext|>"), ("sd2", "!")):
            write_legacy_tokenizer(tmp / name, vocab, merges, pad)
            full[name] = CLIPTokenizer.from_pretrained(str(tmp / name))
            assert full[name]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        keep, kmerges = reachable(full["sd15"], vocab, merges)
        small = {k: v for k, v in vocab.items() if k in keep}
        for name, pad in (("sd15", "<|endoftext|>"), ("sd2", "!")):
            d = out / "clip-vocab" / name
            if d.exists():
                shutil.rmtree(d)
            write_legacy_tokenizer(d, small, kmerges, pad)
            ids, mask = token_ids(full[name], PROMPTS)
            cut, _ = token_ids(CLIPTokenizer.from_pretrained(str(d)), PROMPTS)
            assert torch.equal(ids, cut), f"cut-down {name} vocab changes the ids"
            t[f"real.{name}.ids"] = ids
            t[f"real.{name}.mask"] = mask
        # ---- a dense tiny vocab (the reachable real tokens plus the whole byte alphabet)
        alpha = bytes_to_unicode()
        tiny_tokens = sorted(keep | set(alpha) | {c + "</w>" for c in alpha}, key=vocab.__getitem__)
        tiny = {tk: i for i, tk in enumerate(tiny_tokens)}
        assert tiny["!"] == 0
        write_legacy_tokenizer(tmp / "tiny", tiny, kmerges, "<|endoftext|>")
        (tmp / "tiny" / "special_tokens_map.json").unlink()
        (tmp / "tiny" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": TEXT_MAX}))
        tok1 = CLIPTokenizer.from_pretrained(str(tmp / "tiny"))

    # ---- tiny-sd: SD 1.x-style text encoder + a tokenizer as transformers 5 saves it
    d = out / "tiny-sd"
    base = dict(vocab_size=len(tiny), max_position_embeddings=TEXT_MAX, bos_token_id=tiny["<|startoftext|>"],
                eos_token_id=tiny["<|endoftext|>"], pad_token_id=tiny["<|endoftext|>"])
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=3, hidden_act="quick_gelu", **base))
    reinit_text(te1, gen)
    te1.eval()
    te1.save_pretrained(str(d / "text_encoder"), safe_serialization=True)
    tok1.save_pretrained(str(d / "tokenizer"))
    index = json.loads((d / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "CLIPTextModel"]
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (d / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tok1 = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
    ids, mask = token_ids(tok1, PROMPTS)
    t["sd.ids"] = ids
    sel = [0, 3, 6, 9, 11, 13]
    t["sd.embeds"] = encode(te1, ids[sel], mask[sel])
    t["sd.embeds_skip1"] = encode(te1, ids[:2], mask[:2], clip_skip=1)

    # ---- tiny-clip-sd2: SD 2.x-style (gelu, text_model.-prefixed weights, pad "!", legacy files)
    d2 = out / "tiny-clip-sd2"
    if d2.exists():
        shutil.rmtree(d2)
    te2 = CLIPTextModel(CLIPTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=2, hidden_act="gelu", **base))
    te2.config.use_attention_mask = True
    reinit_text(te2, gen)
    te2.eval()
    te2.save_pretrained(str(d2 / "text_encoder"), safe_serialization=True)
    w = load_file(str(d2 / "text_encoder" / "model.safetensors"))
    save_file({f"text_model.{k}": v.contiguous() for k, v in w.items()}, str(d2 / "text_encoder" / "model.safetensors"),
              metadata={"format": "pt"})
    write_legacy_tokenizer(d2 / "tokenizer", tiny, kmerges, "!")
    te2b = CLIPTextModel.from_pretrained(str(d2 / "text_encoder"))
    assert all(torch.equal(a, b) for a, b in zip(te2.state_dict().values(), te2b.state_dict().values()))
    tok2 = CLIPTokenizer.from_pretrained(str(d2 / "tokenizer"))
    ids2, mask2 = token_ids(tok2, PROMPTS)
    t["sd2.ids"] = ids2
    sel2 = [0, 1, 12, 13]
    t["sd2.embeds"] = encode(te2b, ids2[sel2], mask2[sel2])
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "text.safetensors"),
              metadata={"prompts": json.dumps(PROMPTS), "sd.embeds": json.dumps(sel), "sd2.embeds": json.dumps(sel2)})

    # ---- StableDiffusionPipeline(prompt=...) on tiny-sd
    from diffusers import StableDiffusionPipeline

    lat = load_file(str(out / "pipeline.safetensors"))["latents"]
    runs = [
        {"key": "ddim_cfg", "scheduler": "ddim", "guidance": 3.0,
         "prompt": ["a photo of a cat", "Z\u00fcrich at night, 42 lanterns!"],
         "negative": ["blurry, low quality", ""], "clip_skip": None},
        {"key": "pndm_one_prompt", "scheduler": "pndm", "guidance": 4.0, "prompt": "A Photo OF a CAT!!!",
         "negative": None, "clip_skip": None},
        {"key": "euler_skip1", "scheduler": "euler", "guidance": 2.5, "prompt": ["don't panic", "it's fine"],
         "negative": ["no", "yes"], "clip_skip": 1},
        {"key": "dpm_noguide", "scheduler": "dpmpp-2m", "guidance": 1.0, "prompt": ["a photo of a cat", "caf\u00e9"],
         "negative": None, "clip_skip": None},
    ]
    res = {}
    for r in runs:
        sch = CLASSES[r["scheduler"]].from_pretrained(str(d), subfolder="scheduler")
        p = StableDiffusionPipeline.from_pretrained(str(d), scheduler=sch, safety_checker=None,
                                                    feature_extractor=None, image_encoder=None,
                                                    requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        n = 2 if isinstance(r["prompt"], str) else 1
        with torch.no_grad():
            if r["clip_skip"] is None:
                out_lat = p(prompt=r["prompt"], negative_prompt=r["negative"], latents=lat.clone(),
                            num_images_per_prompt=n, num_inference_steps=PIPE_STEPS,
                            guidance_scale=r["guidance"], output_type="latent").images
            else:
                # diffusers 0.42's clip_skip path reads text_encoder.text_model, which transformers 5's
                # CLIPTextModel no longer has: encode as that path means to, then pass the embeddings.
                pe, ne = p.encode_prompt(r["prompt"], "cpu", 1, r["guidance"] > 1, r["negative"], clip_skip=None)
                ids_p, m_p = token_ids(p.tokenizer, r["prompt"])
                ids_n, m_n = token_ids(p.tokenizer, r["negative"])
                pe = encode(p.text_encoder, ids_p, m_p, clip_skip=r["clip_skip"])
                out_lat = p(prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat.clone(),
                            num_inference_steps=PIPE_STEPS, guidance_scale=r["guidance"],
                            output_type="latent").images
        res[f"final.{r['key']}"] = out_lat
    save_file({k: v.contiguous() for k, v in res.items()}, str(out / "prompt.safetensors"),
              metadata={"runs": json.dumps(runs), "steps": str(PIPE_STEPS)})
    print(f"text: {len(PROMPTS)} prompts, tiny vocab {len(tiny)}, real cut-down {len(small)} tokens / {len(kmerges)} merges")


if __name__ == "__main__":
    main()
