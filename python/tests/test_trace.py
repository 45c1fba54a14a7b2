"""ftk.trace against transformers' own router outputs, through route-hist.

Each family is a tiny random-weight model built from its config class. The
reference ids come from the logits the model reports itself
(`output_router_logits=True`, recorded by transformers, not by our hooks),
selected the way each family's router documents it (softmax top-k; DeepSeek-V2
group-limited greedy; DeepSeek-V3 sigmoid + correction bias + group limit).
route-hist's counts of the captured trace must equal the counts of those ids,
layer by layer, with the decoder-layer index (dense layers leave gaps).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ftk import find_binary  # noqa: E402
from ftk.trace import RouterTrace  # noqa: E402

E, K, V = 8, 2, 96
PY = Path(__file__).resolve().parents[1]


def _attn(**kw):
    return dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_attention_heads=4, max_position_embeddings=64, **kw)


def families():
    t = transformers
    return {
        "mixtral": (
            t.MixtralForCausalLM,
            t.MixtralConfig(**_attn(num_hidden_layers=3, num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K)),
            "softmax",
        ),
        # MoE every 2nd layer: layers 1 and 3, gaps at 0 and 2.
        "qwen2_moe": (
            t.Qwen2MoeForCausalLM,
            t.Qwen2MoeConfig(
                **_attn(num_hidden_layers=4, num_key_value_heads=2, num_experts=E, num_experts_per_tok=K),
                moe_intermediate_size=16,
                shared_expert_intermediate_size=16,
                decoder_sparse_step=2,
            ),
            "softmax",
        ),
        "qwen3_moe": (
            t.Qwen3MoeForCausalLM,
            t.Qwen3MoeConfig(
                **_attn(num_hidden_layers=3, num_key_value_heads=2, num_experts=E, num_experts_per_tok=K),
                head_dim=8,
                moe_intermediate_size=16,
                mlp_only_layers=[0],
            ),
            "softmax",
        ),
        "deepseek_v2": (
            t.DeepseekV2ForCausalLM,
            t.DeepseekV2Config(
                **_attn(num_hidden_layers=3, num_key_value_heads=4),
                moe_intermediate_size=16,
                n_routed_experts=E,
                n_shared_experts=1,
                num_experts_per_tok=K,
                first_k_dense_replace=1,
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                kv_lora_rank=16,
                q_lora_rank=None,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
            ),
            "v2_group",
        ),
        "deepseek_v3": (
            t.DeepseekV3ForCausalLM,
            t.DeepseekV3Config(
                **_attn(num_hidden_layers=3, num_key_value_heads=4),
                moe_intermediate_size=16,
                n_routed_experts=E,
                n_shared_experts=1,
                num_experts_per_tok=K,
                first_k_dense_replace=1,
                n_group=4,
                topk_group=2,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
            ),
            "v3_sigmoid_bias",
        ),
    }


def build(name):
    cls, cfg, rule = families()[name]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        # Router weights large enough that routing is far from uniform; DeepSeek-V3's
        # correction bias large enough to change which experts win.
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.linspace(-0.3, 0.3, E)[torch.randperm(E)])
    return model, cfg, rule


def reference_ids(logits, rule, cfg, gate):
    """Top-k ids from the router logits the model reported, by each family's rule."""
    logits = logits.float()
    if rule == "softmax":
        return torch.topk(torch.softmax(logits, -1), K, dim=-1).indices
    g, tg = cfg.n_group, cfg.topk_group
    if rule == "v2_group":
        s = torch.softmax(logits, -1)
        gs = s.view(-1, g, E // g).max(-1).values
    else:
        s = torch.sigmoid(logits) + gate.e_score_correction_bias
        gs = s.view(-1, g, E // g).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(gs).scatter_(1, torch.topk(gs, tg, dim=-1).indices, 1.0)
    keep = keep.unsqueeze(-1).expand(-1, g, E // g).reshape(-1, E).bool()
    s = s.masked_fill(~keep, float("-inf") if rule != "v2_group" else 0.0)
    return torch.topk(s, K, dim=-1).indices


def route_hist_counts(path, *extra):
    out = subprocess.run(
        [find_binary("route-hist"), "--experts", str(E), "--ep", "2", *extra, str(path)],
        capture_output=True, text=True, check=True,
    ).stdout
    recs = [json.loads(ln) for ln in out.splitlines()]
    return {(r["layer"], r["step"]): r["counts"] for r in recs}


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: those positions are not tokens
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_trace_counts_equal_the_models_own_routing(tmp_path, name):
    model, cfg, rule = build(name)
    ids, mask = batch()
    tr = RouterTrace(logits=True).attach_hf(model)
    tr.token_mask = mask
    with torch.no_grad(), tr.step(3):
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    tr.detach()
    path = tmp_path / "trace.safetensors"
    saved = tr.save(path)
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    assert tr.layers() == moe_layers
    got = route_hist_counts(path)
    keep = mask.reshape(-1).bool()
    differs = 0
    for L, logits in zip(moe_layers, out.router_logits, strict=True):
        gate = model.model.layers[L].mlp.gate
        ref = reference_ids(logits, rule, cfg, gate)[keep]
        want = np.bincount(ref.numpy().ravel(), minlength=E).tolist()
        assert got[(L, 3)] == want, f"{name} layer {L}"
        assert int(keep.sum()) * K == sum(got[(L, 3)])
        np.testing.assert_allclose(saved[f"layer.{L}.logits"], logits.float()[keep].numpy(), rtol=0, atol=0)
        plain = torch.topk(logits.float()[keep], K, dim=-1).indices
        differs += int((torch.sort(plain, -1).values != torch.sort(ref, -1).values).any(-1).sum())
    if name == "deepseek_v3":
        # The bias and group limit change the choice: softmax of logits would be wrong.
        assert differs > 0


def test_jsonl_stream_per_step_and_route_hist_into_mem_plan(tmp_path):
    model, cfg, _ = build("mixtral")
    ids, mask = batch()
    f = open(tmp_path / "trace.jsonl", "w")
    tr = RouterTrace(stream=f, rank=0).attach_hf(model)
    tr.token_mask = mask
    with torch.no_grad():
        for step in (0, 1):
            with tr.step(step):
                model(input_ids=ids, attention_mask=mask)
    f.close()
    recs = [json.loads(ln) for ln in open(tmp_path / "trace.jsonl")]
    assert {(r["layer"], r["step"]) for r in recs} == {(L, s) for L in range(3) for s in (0, 1)}
    got = route_hist_counts(tmp_path / "trace.jsonl")
    assert set(got) == {(L, s) for L in range(3) for s in (0, 1)}
    assert got[(0, 0)] == got[(0, 1)]  # same batch both steps
    # The whole pipeline a user runs: trace -> route-hist -> mem-plan.
    mixtral = PY.parent / "testdata/configs/mixtral-8x7b/config.json"
    rh = subprocess.run(
        [find_binary("route-hist"), "--model", str(mixtral), "--ep", "2", str(tmp_path / "trace.jsonl")],
        capture_output=True, check=True,
    )
    mp = subprocess.run(
        [find_binary("mem-plan"), "--model", str(mixtral), "--tp", "1", "--pp", "1", "--ep", "2", "--dp", "2",
         "--seq", "4096", "--device-mem", "80GiB"],
        input=rh.stdout, capture_output=True,
    )
    assert mp.returncode in (0, 1), mp.stderr.decode()
    assert mp.stdout.strip(), mp.stderr.decode()


def test_cli_token_ids_folder_without_tokenizer(tmp_path):
    from safetensors.torch import save_file

    model, cfg, rule = build("qwen2_moe")
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    ids, mask = batch()
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}, str(tmp_path / "ids.safetensors"))
    out = tmp_path / "trace.safetensors"
    p = subprocess.run(
        [sys.executable, "-m", "ftk.trace", "--model", str(mdir), "--token-ids", str(tmp_path / "ids.safetensors"),
         "-o", str(out), "--batch-size", "2", "--logits", "--dtype", "float32"],
        capture_output=True, text=True, cwd=PY,
    )
    assert p.returncode == 0, p.stderr
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    got = route_hist_counts(out)
    keep = mask.reshape(-1).bool()
    for L, logits in zip([1, 3], ref.router_logits, strict=True):
        want = np.bincount(reference_ids(logits, rule, cfg, None)[keep].numpy().ravel(), minlength=E).tolist()
        assert got[(L, 0)] == want
    # Errors: one line, exit 2, no output file.
    bad = tmp_path / "none.safetensors"
    p = subprocess.run(
        [sys.executable, "-m", "ftk.trace", "--model", str(mdir), "--prompts", str(tmp_path / "missing.txt"), "-o", str(bad)],
        capture_output=True, text=True, cwd=PY,
    )
    assert p.returncode == 2 and p.stderr.startswith("ftk.trace: error: "), p.stderr
    assert not bad.exists()


class TopKRouter(torch.nn.Module):
    """Megatron-Core's TopKRouter interface (megatron-core is not installed for
    CPU tests): forward(input) -> (probs, routing_map [tokens, experts] bool),
    logits from `gating`, `topk` and a 1-based `layer_number`."""

    def __init__(self, hidden, experts, topk, layer_number):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(experts, hidden))
        self.topk = topk
        self.layer_number = layer_number

    def gating(self, x):
        return torch.nn.functional.linear(x, self.weight)

    def routing(self, logits):
        probs = torch.softmax(logits, -1)
        top = torch.topk(probs, self.topk, dim=-1)
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top.indices, True)
        return probs * routing_map, routing_map

    def forward(self, x):
        x = x.view(-1, x.shape[-1])
        return self.routing(self.gating(x))


def test_megatron_topk_router_hook(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.ModuleList([TopKRouter(16, E, K, layer_number=n) for n in (1, 2)])
    tr = RouterTrace(logits=True).attach_megatron(model)
    x = torch.randn(4, 10, 16)
    with torch.no_grad():
        outs = [m(x) for m in model]
    saved = tr.save(tmp_path / "mc.safetensors", step=5)
    got = route_hist_counts(tmp_path / "mc.safetensors")
    for L, (_, rmap) in enumerate(outs):
        assert got[(L, 5)] == rmap.sum(0).tolist()
        np.testing.assert_array_equal(saved[f"layer.{L}.logits"], model[L].gating(x.view(-1, 16)).detach().numpy())
    tr.detach()
    assert "gating" not in vars(model[0])
