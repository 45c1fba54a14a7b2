"""Make testdata/bad/files/: hostile inputs for the bad-input corpus
(testdata/bad/cases.txt), derived from the checked-in fixtures.

Standard library only: `python3 testdata/gen/bad_files.py` rewrites the
files byte for byte (no randomness).
"""

import json
import math
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "bad", "files")


def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def write_st(path, tensors, meta=None):
    """tensors: name -> (dtype, shape, raw bytes); safetensors layout."""
    header, data, off = {}, b"", 0
    if meta:
        header["__metadata__"] = meta
    for name in sorted(tensors):
        dt, shape, raw = tensors[name]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def load(path):
    header, data = read_st(path)
    meta = header.pop("__metadata__", None)
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        out[k] = (v["dtype"], v["shape"], data[a:b])
    return out, meta


def poke_f32(t, index, value):
    dt, shape, raw = t
    raw = bytearray(raw)
    raw[4 * index : 4 * index + 4] = struct.pack("<f", value)
    return (dt, shape, bytes(raw))


def main():
    os.makedirs(OUT, exist_ok=True)
    # diffuse-synth: a NaN in --prompt-embeds
    ts, meta = load(os.path.join(ROOT, "diffuse-synth", "pipeline.safetensors"))
    keep = {k: ts[k] for k in ("prompt_embeds", "negative_prompt_embeds", "latents")}
    keep["prompt_embeds"] = poke_f32(keep["prompt_embeds"], 7, math.nan)
    write_st(os.path.join(OUT, "prompt_nan.safetensors"), keep)
    lat = {k: ts[k] for k in ("prompt_embeds", "negative_prompt_embeds", "latents")}
    lat["latents"] = poke_f32(lat["latents"], 3, math.inf)
    write_st(os.path.join(OUT, "latents_inf.safetensors"), lat)
    # chunk-run: a NaN in x, and an input with no tokens
    ts, _ = load(os.path.join(ROOT, "chunk-run", "mixtral_k2.input.safetensors"))
    write_st(os.path.join(OUT, "chunk_x_nan.safetensors"),
             {"x": poke_f32(ts["x"], 5, math.nan), "dy": ts["dy"]})
    h = ts["x"][1][1]
    write_st(os.path.join(OUT, "chunk_x_empty.safetensors"),
             {"x": ("F32", [0, h], b""), "dy": ("F32", [0, h], b"")})
    # a manifest that is not text
    with open(os.path.join(OUT, "binary_manifest.jsonl"), "wb") as f:
        f.write(bytes([0x7B, 0xFF, 0xFE, 0x00, 0x80, 0x0A]) + bytes(range(256)))
    # mem-plan: 3 counts for an 8-expert record
    with open(os.path.join(OUT, "hist_3_counts.jsonl"), "w") as f:
        f.write(json.dumps({"kind": "route_hist", "layer": 0, "step": 0, "experts": 8,
                            "topk": 2, "tokens": 3, "counts": [2, 2, 2], "ep": 1,
                            "rank_counts": [6], "max_vio": 0.0, "a2a": [[6]]}) + "\n")
    # a config whose sizes are 2^64 - 1
    cfg = json.load(open(os.path.join(ROOT, "configs", "mixtral-8x7b", "config.json")))
    cfg["num_hidden_layers"] = 2**64 - 1
    json.dump(cfg, open(os.path.join(OUT, "huge_layers_config.json"), "w"), indent=1)
    cfg = json.load(open(os.path.join(ROOT, "configs", "mixtral-8x7b", "config.json")))
    cfg["hidden_size"] = 1 << 20
    cfg["intermediate_size"] = 1 << 22
    cfg["num_local_experts"] = 1 << 20
    json.dump(cfg, open(os.path.join(OUT, "huge_params_config.json"), "w"), indent=1)
    # a client whose data section is cut short
    ts, meta = load(os.path.join(ROOT, "fed-aggregate", "clients", "r1_c0.safetensors"))
    full = open(os.path.join(ROOT, "fed-aggregate", "clients", "r1_c0.safetensors"), "rb").read()
    with open(os.path.join(OUT, "client_truncated.safetensors"), "wb") as f:
        f.write(full[: len(full) - 16])
    # chunk-run: finite router weights whose logits overflow to inf - inf = NaN
    # (layer 0 only; x's first two features set to 10)
    ts, _ = load(os.path.join(ROOT, "chunk-run", "mixtral_k2.weights.safetensors"))
    keep = {k: v for k, v in ts.items() if k.startswith("layers.0.")}
    g = "layers.0.gate.weight"
    keep[g] = poke_f32(poke_f32(keep[g], 0, 3e38), 1, -3e38)
    write_st(os.path.join(OUT, "router_overflow.weights.safetensors"), keep)
    ts, _ = load(os.path.join(ROOT, "chunk-run", "mixtral_k2.input.safetensors"))
    x = ts["x"]
    for row in range(x[1][0]):
        x = poke_f32(poke_f32(x, row * x[1][1], 10.0), row * x[1][1] + 1, 10.0)
    write_st(os.path.join(OUT, "router_overflow.input.safetensors"), {"x": x, "dy": ts["dy"]})
    # fed-embed: one label of 2^40 among 100 samples (was: a 562 TB allocation)
    ts, _ = load(os.path.join(ROOT, "fed-embed", "server.safetensors"))
    dt, shape, raw = ts["labels"]
    raw = bytearray(raw)
    raw[8 * 5 : 8 * 6] = struct.pack("<q", 1 << 40)
    write_st(os.path.join(OUT, "labels_2p40.safetensors"),
             {"features": ts["features"], "labels": (dt, shape, bytes(raw))})


if __name__ == "__main__":
    main()
