"""PyTorch + transformers reference for chunk-run (tools/chunk-run).

Builds stacks of transformers' own sparse MoE blocks (MixtralSparseMoeBlock; for
norm_topk_prob=false, Qwen3MoeSparseMoeBlock), runs y = x + block(x) per layer in
float32, loss = sum(y * dy), autograd backward, and writes per case:
  <case>.weights.safetensors  layer weights under "layers.{l}." (per-expert w1/w2/w3
                              names as transformers 4.x saved them; one case keeps
                              transformers 5's fused gate_up_proj / down_proj)
  <case>.input.safetensors    x, dy [T, h]
  <case>.expected.safetensors y, grad.x, grad.layers.{l}.gate.weight,
                              grad.layers.{l}.experts.{e}.w1/w2/w3.weight
and cases.json (the flags chunk-run needs). Run from the repository root:
  .venv/bin/python testdata/gen/chunk_run_ref.py
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

OUT = os.path.join(os.path.dirname(__file__), "..", "chunk-run")

CASES = [
    # name, h, f, E, k, T, layers, norm_topk_prob, skew, fused
    ("mixtral_k2", 32, 48, 8, 2, 64, 2, True, 0.0, False),
    ("skewed", 32, 40, 8, 2, 96, 2, True, 3.0, True),
    ("top1", 24, 40, 4, 1, 50, 1, True, 0.0, False),
    ("no_norm_k4", 32, 32, 16, 4, 70, 2, False, 0.0, False),
]


def block(h, f, e, k, norm):
    if norm:
        cfg = MixtralConfig(hidden_size=h, intermediate_size=f, num_local_experts=e,
                            num_experts_per_tok=k, router_jitter_noise=0.0)
        return MixtralSparseMoeBlock(cfg)
    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=f, num_experts=e,
                         num_experts_per_tok=k, norm_topk_prob=False)
    return Qwen3MoeSparseMoeBlock(cfg)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(20251125)
    cases = []
    for name, h, f, e, k, t, layers, norm, skew, fused in CASES:
        blocks = []
        weights = {}
        for layer in range(layers):
            b = block(h, f, e, k, norm).float()
            with torch.no_grad():
                b.gate.weight.normal_(0, 0.3)
                if skew:
                    # one expert's router row aligned with a common direction:
                    # most tokens pick it (a skewed-routing case)
                    b.gate.weight[1] += skew * torch.ones(h) / h ** 0.5
                b.experts.gate_up_proj.normal_(0, 0.2)
                b.experts.down_proj.normal_(0, 0.2)
            b.train()
            blocks.append(b)
            p = f"layers.{layer}."
            weights[p + "gate.weight"] = b.gate.weight.detach().clone()
            gu, down = b.experts.gate_up_proj.detach(), b.experts.down_proj.detach()
            if fused:
                weights[p + "experts.gate_up_proj"] = gu.clone()
                weights[p + "experts.down_proj"] = down.clone()
            else:
                for i in range(e):
                    weights[p + f"experts.{i}.w1.weight"] = gu[i, :f].clone()
                    weights[p + f"experts.{i}.w3.weight"] = gu[i, f:].clone()
                    weights[p + f"experts.{i}.w2.weight"] = down[i].clone()
        x = torch.randn(t, h)
        if skew:
            x += 1.0  # the common direction the skewed router row favours
        dy = torch.randn(t, h)
        xr = x.clone().requires_grad_(True)
        y = xr
        for b in blocks:
            y = y + b(y.unsqueeze(0)).squeeze(0)
        loss = (y * dy).sum()
        loss.backward()
        expected = {"y": y.detach(), "grad.x": xr.grad.detach()}
        counts = torch.zeros(e)
        for layer, b in enumerate(blocks):
            p = f"grad.layers.{layer}."
            expected[p + "gate.weight"] = b.gate.weight.grad.detach()
            g_gu, g_down = b.experts.gate_up_proj.grad, b.experts.down_proj.grad
            for i in range(e):
                expected[p + f"experts.{i}.w1.weight"] = g_gu[i, :f].clone()
                expected[p + f"experts.{i}.w3.weight"] = g_gu[i, f:].clone()
                expected[p + f"experts.{i}.w2.weight"] = g_down[i].clone()
        with torch.no_grad():
            _, _, idx = blocks[0].gate(x)
            counts = torch.bincount(idx.flatten(), minlength=e)
        save_file({k2: v.contiguous() for k2, v in weights.items()}, os.path.join(OUT, f"{name}.weights.safetensors"))
        save_file({"x": x.contiguous(), "dy": dy.contiguous()}, os.path.join(OUT, f"{name}.input.safetensors"))
        save_file({k2: v.contiguous() for k2, v in expected.items()}, os.path.join(OUT, f"{name}.expected.safetensors"))
        flags = ["--topk", str(k), "--layers", str(layers), "--prefix", "layers.{l}."]
        if not norm:
            flags += ["--norm-topk-prob", "false"]
        cases.append({"name": name, "flags": flags, "loss": loss.item(),
                      "layer0_expert_counts": counts.tolist(), "fused_weights": fused,
                      "block": "MixtralSparseMoeBlock" if norm else "Qwen3MoeSparseMoeBlock"})
    with open(os.path.join(OUT, "cases.json"), "w") as fh:
        json.dump({"torch": torch.__version__, "cases": cases}, fh, indent=2)
    print(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
