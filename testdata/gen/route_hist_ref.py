#!/usr/bin/env python3
"""Independent numpy reference for ftk's `route-hist` tool.

Two sub-commands:

  gen   [--out DIR] [--check]
        Regenerate, deterministically, every fixture under testdata/route-hist/
        (inputs, *.expected.jsonl, cases.json, bad/*). With --check, generate
        into a temporary directory and compare byte-for-byte with the checked-in
        tree instead of writing (exit status 1 on any difference).

  hist  FILE [--experts E] [--topk K] [--ep N] [--capacity-factor CF]
        Print the route_hist records for one trace, computed by this reference
        (handy when debugging the Rust tool against a new input).

Nothing here calls the Rust tool: routing, histograms, all-to-all matrices and
capacity drops are computed with plain numpy (np.bincount, np.argsort, ...)
and cross-checked against a second, naive pure-Python implementation.

Semantics implemented (see testdata/gen/README.md for the full statement):
  * JSONL record {"kind":"route","layer":L,"step":S,"rank":R,"topk":[[e..]..]}
    is one micro-batch of source rank R.
  * safetensors `layer.{L}.topk` int [T,k], or `layer.{L}.logits` float [T,E]
    (routing = top-k of the logits by descending value, ties -> lower expert
    index, computed on the values the file holds); step = 0; with --ep N,
    token i comes from rank r with r*T//N <= i < (r+1)*T//N.
  * expert e lives on EP rank e // (E/N).
  * capacity = ceil((n_tokens*k/E) * CF) per micro-batch unit (JSONL record or
    safetensors rank block); dropped += sum_e max(0, count_e - capacity).
  * JSONL source ranks: rank R sends as EP-local rank R mod N (EP groups are
    consecutive blocks of N ranks), as route-hist documents in --help.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from fractions import Fraction

import numpy as np
from safetensors.numpy import load_file, save_file

SEED = 0x5EED_2024
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "route-hist"))
SIZE_BUDGET = 2 * 1024 * 1024

# ----------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------

# safetensors dtype string -> numpy dtype (little endian). BF16 handled by hand.
NP_DTYPES = {
    "I8": np.dtype("<i1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
    "U8": np.dtype("<u1"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # raw bits
}
INT_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits: round-to-nearest-even on the upper 16 bits."""
    b = np.ascontiguousarray(x, dtype="<f4").view("<u4").astype(np.uint64)
    lsb = (b >> 16) & 1
    out = ((b + 0x7FFF + lsb) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = ((b[nan] >> 16) | 0x0040).astype(np.uint16)  # keep NaN quiet
    return out


def bf16_bits_to_f32(u: np.ndarray) -> np.ndarray:
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view("<f4")


def check_bf16_rounding(x: np.ndarray) -> None:
    """Second, arithmetic implementation of RNE to bf16; must agree bit-for-bit."""
    x = np.asarray(x, dtype=np.float32).ravel()
    x = x[np.isfinite(x)]
    bits = x.view(np.uint32)
    lo = (bits >> 16).astype(np.uint16)                   # truncated candidate
    hi = (lo.astype(np.uint32) + 1).astype(np.uint16)     # next one away from zero
    vlo = bf16_bits_to_f32(lo).astype(np.float64)
    vhi = bf16_bits_to_f32(hi).astype(np.float64)
    xd = x.astype(np.float64)
    dlo, dhi = np.abs(xd - vlo), np.abs(vhi - xd)
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (lo % 2 == 1))
    want = np.where(pick_hi, hi, lo)
    got = f32_to_bf16_bits(x)
    assert np.array_equal(want, got), "bf16 rounding implementations disagree"
    # hand-picked vectors: 1 + 2^-8 is a tie -> even (1.0); 1 + 3*2^-8 -> up.
    v = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -1.0 - 2**-8, 3.140625], dtype=np.float32)
    assert f32_to_bf16_bits(v).tolist() == [0x3F80, 0x3F82, 0xBF80, 0x4049]


# ----------------------------------------------------------------------------
# safetensors: hand writer + hand reader (independent of the library)
# ----------------------------------------------------------------------------

def st_bytes(tensors, metadata=None) -> bytes:
    """tensors: list of (name, dtype_str, shape, raw_bytes), written in order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)  # pad like the reference implementation
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)


def st_read(path):
    """Minimal safetensors reader: {name: (dtype_str, np.ndarray)}; BF16 -> float32 values."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError("header length exceeds file size")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        a, b = info["data_offsets"]
        if dt not in NP_DTYPES or b > len(data) or a > b:
            raise ValueError(f"bad tensor entry {name}: {info}")
        arr = np.frombuffer(data[a:b], dtype=NP_DTYPES[dt]).reshape(info["shape"])
        if dt == "BF16":
            arr = bf16_bits_to_f32(arr)
        out[name] = (dt, arr)
    return out


# ----------------------------------------------------------------------------
# routing reference
# ----------------------------------------------------------------------------

def topk_from_logits(v: np.ndarray, k: int) -> np.ndarray:
    """Top-k by descending value, ties toward the lower expert index."""
    v = np.asarray(v)
    if np.isnan(v).any():
        raise ValueError("NaN in router logits")
    order = np.argsort(-v, axis=1, kind="stable")
    return order[:, :k]


def check_topk_from_logits(v: np.ndarray, k: int, got: np.ndarray) -> None:
    T, E = v.shape
    idx = np.broadcast_to(np.arange(E), v.shape)
    alt = np.lexsort((idx, -v), axis=1)[:, :k]            # secondary key: index
    assert np.array_equal(np.sort(got, 1), np.sort(alt, 1)), "argsort vs lexsort top-k"
    # softmax (float64 and float32) then top-k gives the same sets on these fixtures
    for dt in (np.float64, np.float32):
        z = v.astype(dt)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p = p / p.sum(axis=1, keepdims=True)
        sm = np.lexsort((idx, -p), axis=1)[:, :k]
        assert np.array_equal(np.sort(got, 1), np.sort(sm, 1)), f"softmax({dt.__name__}) top-k differs"
    # brute force on a prefix of rows
    for t in range(min(T, 300)):
        row = [float(x) for x in v[t]]
        want = sorted(range(E), key=lambda e: (-row[e], e))[:k]
        assert sorted(want) == sorted(got[t].tolist()), f"brute-force top-k row {t}"


def capacity(n_tokens: int, k: int, E: int, cf: str) -> int:
    """Megatron get_capacity applied to n_tokens*k: ceil((n*k/E) * CF)."""
    f = math.ceil((n_tokens * k / E) * float(cf))
    exact = math.ceil(Fraction(n_tokens * k, E) * Fraction(cf))
    other_order = math.ceil(n_tokens * k * float(cf) / E)
    assert f == exact == other_order, (
        f"fragile capacity for n={n_tokens} k={k} E={E} CF={cf}: "
        f"{f} / {exact} / {other_order}; pick other sizes")
    return f


def hist_group(units, E, k, N, cf):
    """units: list of (source_rank, topk int array [n, k]). Returns dict of results."""
    assert E % N == 0, "E must be divisible by --ep"
    per = E // N
    counts = np.zeros(E, np.int64)
    a2a = np.zeros((N, N), np.int64)
    tokens = 0
    dropped = 0
    for src, tk in units:
        tk = np.asarray(tk, dtype=np.int64)
        if tk.ndim != 2 or tk.shape[1] != k:
            raise ValueError("topk rows must all have k entries")
        if tk.size and (tk.min() < 0 or tk.max() >= E):
            raise ValueError("expert id out of range")
        c = np.bincount(tk.ravel(), minlength=E)
        counts += c
        a2a[src] += np.bincount(tk.ravel() // per, minlength=N)
        tokens += tk.shape[0]
        if cf is not None:
            cap = capacity(tk.shape[0], k, E, cf)
            dropped += int(np.maximum(c - cap, 0).sum())
    rank_counts = counts.reshape(N, per).sum(axis=1)
    mean = tokens * k / E
    max_vio = (int(counts.max()) - mean) / mean
    return dict(tokens=tokens, counts=counts, rank_counts=rank_counts, a2a=a2a,
                max_vio=max_vio, dropped=dropped if cf is not None else None)


def hist_group_naive(units, E, k, N, cf):
    """Pure-Python re-implementation (loops over every (token, expert) pair)."""
    per = E // N
    counts = [0] * E
    a2a = [[0] * N for _ in range(N)]
    tokens = dropped = 0
    for src, tk in units:
        unit = [0] * E
        for row in tk.tolist():
            tokens += 1
            for e in row:
                counts[e] += 1
                unit[e] += 1
                a2a[src][e // per] += 1
        if cf is not None:
            n = len(tk)
            cap = math.ceil(Fraction(n * k, E) * Fraction(cf))
            dropped += sum(max(0, c - cap) for c in unit)
    return counts, a2a, tokens, (dropped if cf is not None else None)


def make_record(layer, step, E, k, N, res):
    rec = {
        "kind": "route_hist", "layer": int(layer), "step": int(step),
        "experts": int(E), "topk": int(k), "tokens": int(res["tokens"]),
        "counts": res["counts"].tolist(), "ep": int(N),
        "rank_counts": res["rank_counts"].tolist(), "max_vio": float(res["max_vio"]),
        "a2a": res["a2a"].tolist(),
    }
    if res["dropped"] is not None:
        rec["dropped"] = int(res["dropped"])
    return rec


def records_for_groups(groups, E, k, N, cf):
    """groups: {(step, layer): [units]} -> list of records sorted by step, layer."""
    recs = []
    for (step, layer) in sorted(groups):
        units = groups[(step, layer)]
        res = hist_group(units, E, k, N, cf)
        counts, a2a, tokens, dropped = hist_group_naive(units, E, k, N, cf)
        assert counts == res["counts"].tolist() and a2a == res["a2a"].tolist()
        assert tokens == res["tokens"] and dropped == res["dropped"]
        assert res["counts"].sum() == res["rank_counts"].sum() == res["a2a"].sum() == tokens * k
        recs.append(make_record(layer, step, E, k, N, res))
    return recs


def safetensors_units(topk: np.ndarray, N: int):
    T = topk.shape[0]
    return [(r, topk[r * T // N:(r + 1) * T // N]) for r in range(N)]


# ----------------------------------------------------------------------------
# readers used by `hist` (and as a round-trip check by `gen`)
# ----------------------------------------------------------------------------

def analyse_file(path, experts=None, topk=None, ep=1, cf=None):
    if path.endswith(".jsonl"):
        return analyse_jsonl(path, experts, ep, cf)
    return analyse_safetensors(path, experts, topk, ep, cf)


def analyse_jsonl(path, E, N, cf):
    if E is None:
        raise ValueError("--experts is required for JSONL traces")
    recs = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {lineno}: {e}") from None
            if r.get("kind") != "route":
                continue
            for key in ("layer", "step", "rank", "topk"):
                if key not in r:
                    raise ValueError(f"line {lineno}: missing {key!r}")
            rows = r["topk"]
            if len({len(x) for x in rows}) > 1:
                raise ValueError(f"line {lineno}: ragged topk rows")
            recs.append(r)
    if not recs:
        raise ValueError("no route records")
    ks = {len(r["topk"][0]) for r in recs if r["topk"]}
    if len(ks) != 1:
        raise ValueError("inconsistent k")
    k = ks.pop()
    groups = {}
    for r in recs:
        tk = np.array(r["topk"], dtype=np.int64).reshape(-1, k)
        groups.setdefault((r["step"], r["layer"]), []).append((r["rank"] % N, tk))
    return records_for_groups(groups, E, k, N, cf)


def analyse_safetensors(path, E, k, N, cf):
    tensors = st_read(path)
    groups = {}
    meta = None
    for name, (dt, arr) in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "layer" or parts[2] not in ("topk", "logits"):
            continue
        layer = int(parts[1])
        if parts[2] == "topk":
            if dt not in INT_DTYPES:
                raise ValueError(f"{name}: topk tensor has non-integer dtype {dt}")
            if E is None:
                raise ValueError("--experts is required for topk traces")
            tk = arr.astype(np.int64)
            this = (E, tk.shape[1])
        else:
            if dt not in FLOAT_DTYPES:
                raise ValueError(f"{name}: logits tensor has non-float dtype {dt}")
            if k is None:
                raise ValueError("--topk is required for logits traces")
            vals = arr if dt == "F64" else arr.astype(np.float32)
            tk = topk_from_logits(vals, k)
            this = (arr.shape[1], k)
        if meta is None:
            meta = this
        elif meta != this:
            raise ValueError("inconsistent experts/topk across layers")
        groups[(0, layer)] = safetensors_units(tk, N)
    if meta is None:
        raise ValueError("no layer.{L}.topk / layer.{L}.logits tensors")
    return records_for_groups(groups, meta[0], meta[1], N, cf)


def dumps_records(recs) -> str:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs)


# ----------------------------------------------------------------------------
# fixture generation
# ----------------------------------------------------------------------------

def skewed_topk(rng, T, E, k, p):
    """k distinct experts per token, sampled from popularity p (Gumbel top-k)."""
    scores = np.log(p + 1e-12)[None, :] + rng.gumbel(size=(T, E))
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rng.permuted(idx, axis=1)  # recorded order within a row is arbitrary


def make_logits(rng, T, E, k, scale=1.5):
    bias = rng.normal(0.0, scale, size=E)               # skew: some experts favoured
    x = bias[None, :] + rng.normal(0.0, 1.0, size=(T, E))
    x = (np.round(x * 256.0) / 256.0).astype(np.float32)  # exact grid -> clean ties
    # exact ties across the top-k boundary, both with a lower and a higher index
    for t in rng.choice(T, size=T // 8, replace=False):
        order = np.argsort(-x[t], kind="stable")
        j = rng.choice(order[k:])
        x[t, j] = x[t, order[k - 1]]
    # rows where three experts tie for the last slot
    for t in rng.choice(T, size=max(2, T // 50), replace=False):
        order = np.argsort(-x[t], kind="stable")
        x[t, order[k:k + 2]] = x[t, order[k - 1]]
    # fully constant rows -> experts 0..k-1
    for t in rng.choice(T, size=3, replace=False):
        x[t, :] = x[t, 0]
    x[x == 0] = 0.0  # no negative zeros (their ordering vs +0 is not what we test)
    return x


def encode_logits(x32: np.ndarray, dt: str):
    """-> (raw bytes, values the file holds as float32/float64 for routing)."""
    if dt == "F32":
        return x32.astype("<f4").tobytes(), x32.astype(np.float32)
    if dt == "F64":
        v = x32.astype("<f8")
        return v.tobytes(), v
    if dt == "F16":
        h = x32.astype("<f2")
        assert np.isfinite(h).all()
        return h.tobytes(), h.astype(np.float32)
    if dt == "BF16":
        check_bf16_rounding(x32)
        bits = f32_to_bf16_bits(x32)
        return bits.astype("<u2").tobytes(), bf16_bits_to_f32(bits)
    raise ValueError(dt)


class Gen:
    def __init__(self, out):
        self.out = out
        self.cases = []
        os.makedirs(os.path.join(out, "bad"), exist_ok=True)

    def write(self, rel, data):
        path = os.path.join(self.out, rel)
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": "\n"})) as f:
            f.write(data)
        return path

    def add_case(self, name, inp, flags, recs, *, experts, topk, ep, cf, note):
        exp = f"{name}.expected.jsonl"
        self.write(exp, dumps_records(recs))
        # round trip: re-read the input file with the hand parser and recompute
        again = analyse_file(os.path.join(self.out, inp), experts=experts, topk=topk, ep=ep, cf=cf)
        assert dumps_records(again) == dumps_records(recs), f"{name}: file round-trip differs"
        self.cases.append({
            "name": name, "input": inp, "flags": flags, "expected": exp,
            "experts": experts, "topk": topk, "ep": ep,
            "capacity_factor": None if cf is None else float(cf), "note": note,
        })


def flags_for(experts=None, topk=None, ep=1, cf=None):
    f = []
    if experts is not None:
        f += ["--experts", str(experts)]
    if topk is not None:
        f += ["--topk", str(topk)]
    f += ["--ep", str(ep)]
    if cf is not None:
        f += ["--capacity-factor", cf]
    return f


def gen_jsonl(g: Gen, rng):
    E, k, R, layers, steps = 16, 2, 4, [0, 1, 2], [0, 1]
    base = {L: rng.dirichlet(np.full(E, 0.6)) for L in layers}
    units = []  # (step, layer, rank, topk)
    lines = []
    for s in steps:
        recs = []
        for L in layers:
            p = 0.8 * base[L] + 0.2 * rng.dirichlet(np.full(E, 1.0))
            for r in range(R):
                n_mb = 2 if rng.random() < 0.25 else 1
                for _ in range(n_mb):
                    n = int(rng.integers(50, 201))
                    tk = skewed_topk(rng, n, E, k, p)
                    recs.append((s, L, r, tk))
        order = rng.permutation(len(recs))
        for i, j in enumerate(order):
            s_, L, r, tk = recs[j]
            obj = {"kind": "route", "layer": L, "step": s_, "rank": r, "topk": tk.tolist()}
            # mostly compact; every third line uses json's default ", " / ": " spacing
            sep = (", ", ": ") if i % 3 == 2 else (",", ":")
            lines.append(json.dumps(obj, separators=sep))
            units.append(recs[j])
    inp = "trace.jsonl"
    g.write(inp, "\n".join(lines) + "\n")
    for N, cf in [(1, None), (2, None), (4, None), (4, "1.0")]:
        groups = {}
        for s, L, r, tk in units:
            groups.setdefault((s, L), []).append((r % N, tk))
        recs = records_for_groups(groups, E, k, N, cf)
        name = f"trace.ep{N}" + ("" if cf is None else f".cf{cf}")
        g.add_case(name, inp, flags_for(experts=E, ep=N, cf=cf), recs,
                   experts=E, topk=None, ep=N, cf=cf,
                   note=f"JSONL, {len(units)} records, 3 layers x 2 steps x 4 source ranks, E={E} k={k}")


def gen_topk_file(g: Gen, rng, fname, E, k, T, dtypes, cases, metadata=None):
    tensors, tk_by_layer = [], {}
    for L, dt in enumerate(dtypes):
        p = rng.dirichlet(np.full(E, 0.5 + 0.25 * L))
        tk = skewed_topk(rng, T, E, k, p)
        tk_by_layer[L] = tk
        arr = tk.astype(NP_DTYPES[dt])
        assert np.array_equal(arr.astype(np.int64), tk)
        tensors.append((f"layer.{L}.topk", dt, arr))
    # written with the safetensors library itself (what real tools produce)
    path = os.path.join(g.out, fname)
    save_file({n: a for n, _, a in tensors}, path, metadata=metadata)
    back = load_file(path)
    for n, _, a in tensors:
        assert back[n].dtype == a.dtype and np.array_equal(back[n], a), f"{fname}:{n} round trip"
    # our hand writer must produce a file the library reads identically
    hand = st_bytes([(n, dt, a.shape, a.tobytes()) for n, dt, a in tensors], metadata)
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as tf:
        tf.write(hand)
    try:
        back2 = load_file(tf.name)
    finally:
        os.unlink(tf.name)
    for n, _, a in tensors:
        assert back2[n].dtype == a.dtype and np.array_equal(back2[n], a), "hand writer round trip"
    for N, cf in cases:
        groups = {(0, L): safetensors_units(tk, N) for L, tk in tk_by_layer.items()}
        recs = records_for_groups(groups, E, k, N, cf)
        stem = fname[: -len(".safetensors")]
        name = f"{stem}.ep{N}" + ("" if cf is None else f".cf{cf}")
        g.add_case(name, fname, flags_for(experts=E, ep=N, cf=cf), recs,
                   experts=E, topk=None, ep=N, cf=cf,
                   note=f"safetensors topk, layers 0..{len(dtypes)-1} as {'/'.join(dtypes)}, E={E} k={k} T={T}")


def gen_logits_file(g: Gen, rng, fname, dt, E, k, T, layers, cases, metadata=None):
    raw_tensors, tk_by_layer = [], {}
    for L in layers:
        x = make_logits(rng, T, E, k)
        raw, vals = encode_logits(x, dt)
        tk = topk_from_logits(vals, k)
        check_topk_from_logits(vals, k, tk)
        tk_by_layer[L] = tk
        raw_tensors.append((f"layer.{L}.logits", dt, (T, E), raw))
    data = st_bytes(raw_tensors, metadata)
    g.write(fname, data)
    if dt != "BF16":  # the library (numpy backend) cannot materialise bf16
        back = load_file(os.path.join(g.out, fname))
        for (n, _, shape, raw) in raw_tensors:
            assert back[n].tobytes() == raw and tuple(back[n].shape) == shape
    # ties genuinely present in what the file holds (not only pre-rounding)
    n_tie_rows = 0
    for L in layers:
        _, vals = st_read(os.path.join(g.out, fname))[f"layer.{L}.logits"]
        srt = -np.sort(-vals.astype(np.float64), axis=1)
        n_tie_rows += int((srt[:, k - 1] == srt[:, k]).sum())
    assert n_tie_rows > 0
    for N, cf in cases:
        groups = {(0, L): safetensors_units(tk, N) for L, tk in tk_by_layer.items()}
        recs = records_for_groups(groups, E, k, N, cf)
        stem = fname[: -len(".safetensors")]
        name = f"{stem}.ep{N}" + ("" if cf is None else f".cf{cf}")
        g.add_case(name, fname, flags_for(topk=k, ep=N, cf=cf), recs,
                   experts=None, topk=k, ep=N, cf=cf,
                   note=f"safetensors {dt} logits, layers {layers}, E={E} k={k} T={T}; "
                        f"{n_tie_rows} rows with an exact tie across the top-k boundary")


def gen_bad(g: Gen, rng):
    bad = []

    def add(fname, data, flags, what):
        g.write(os.path.join("bad", fname), data)
        bad.append({"file": f"bad/{fname}", "flags": flags, "what": what})

    good = st_bytes([("layer.0.topk", "I32", (4, 2),
                      np.array([[0, 1], [2, 3], [4, 5], [6, 7]], "<i4").tobytes())])
    (hlen,) = struct.unpack("<Q", good[:8])
    add("truncated_header.safetensors", good[: 8 + hlen // 2], flags_for(experts=8, ep=1),
        "valid topk file cut in the middle of its JSON header")
    add("header_len_exceeds_file.safetensors", struct.pack("<Q", 1_000_000) + good[8:],
        flags_for(experts=8, ep=1),
        f"8-byte header length says 1000000 but the file is {len(good)} bytes")
    rec = lambda r, tk: json.dumps({"kind": "route", "layer": 0, "step": 0, "rank": r, "topk": tk},
                                   separators=(",", ":"))
    add("syntax_error_line3.jsonl",
        rec(0, [[0, 1], [2, 3]]) + "\n" + rec(1, [[4, 5]]) + "\n"
        + '{"kind":"route","layer":0,"step":0,"rank":2,"topk":[[1,2],[3,4]]\n'
        + rec(3, [[6, 7]]) + "\n",
        flags_for(experts=16, ep=1), "JSON syntax error (missing closing brace) on line 3")
    add("missing_topk.jsonl",
        rec(0, [[0, 1]]) + "\n" + '{"kind":"route","layer":0,"step":0,"rank":1}\n',
        flags_for(experts=16, ep=1), 'line 2 is a route record without "topk"')
    add("expert_out_of_range.jsonl",
        rec(0, [[0, 1], [15, 16]]) + "\n", flags_for(experts=16, ep=1),
        "expert id 16 with --experts 16 (ids must be < E)")
    add("ragged_topk.jsonl",
        rec(0, [[0, 1], [2], [3, 4]]) + "\n", flags_for(experts=16, ep=1),
        "topk rows of different lengths (2, 1, 2)")
    add("empty.jsonl", b"", flags_for(experts=16, ep=1), "empty file (0 bytes)")
    add("empty.safetensors", b"", flags_for(experts=8, ep=1), "empty file (0 bytes)")
    x = rng.normal(size=(16, 8)).astype("<f4")
    x[5, 3] = np.nan
    add("logits_nan.safetensors", st_bytes([("layer.0.logits", "F32", (16, 8), x.tobytes())]),
        flags_for(topk=2, ep=1), "F32 logits [16,8] with a NaN at row 5, expert 3")
    y = np.array([[0, 1]] * 16, dtype="<f4")
    add("topk_float_dtype.safetensors", st_bytes([("layer.0.topk", "F32", (16, 2), y.tobytes())]),
        flags_for(experts=8, ep=1), "layer.0.topk stored as F32 (topk must be an integer dtype)")
    z = np.array([[0, 1]] * 15 + [[7, 8]], dtype="<u1")
    add("topk_out_of_range.safetensors", st_bytes([("layer.0.topk", "U8", (16, 2), z.tobytes())]),
        flags_for(experts=8, ep=1), "U8 topk containing expert id 8 with --experts 8")
    w = np.array([[0, 1]] * 15 + [[-1, 2]], dtype="<i4")
    add("topk_negative.safetensors", st_bytes([("layer.0.topk", "I32", (16, 2), w.tobytes())]),
        flags_for(experts=8, ep=1), "I32 topk containing expert id -1")

    # every bad input must be rejected by this reference too
    for b in bad:
        fl = b["flags"]
        kw = dict(ep=int(fl[fl.index("--ep") + 1]))
        if "--experts" in fl:
            kw["experts"] = int(fl[fl.index("--experts") + 1])
        if "--topk" in fl:
            kw["topk"] = int(fl[fl.index("--topk") + 1])
        try:
            analyse_file(os.path.join(g.out, b["file"]), **kw)
        except (ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError):
            pass
        else:
            raise AssertionError(f"{b['file']} was accepted by the reference")
    g.write(os.path.join("bad", "cases.json"), json.dumps({"cases": bad}, indent=2) + "\n")
    readme = [
        "# route-hist error fixtures",
        "",
        "Generated by `testdata/gen/route_hist_ref.py gen`; do not edit by hand.",
        "Every file here must make `route-hist` exit with an error (non-zero status,",
        "no partial output expected). `cases.json` lists the same files with the",
        "flags to pass. The reference (`route_hist_ref.py hist`) rejects each of them.",
        "",
        "| file | flags | what is wrong |",
        "| --- | --- | --- |",
    ]
    for b in bad:
        readme.append(f"| `{b['file'][4:]}` | `{' '.join(b['flags'])}` | {b['what']} |")
    g.write(os.path.join("bad", "README.md"), "\n".join(readme) + "\n")


def generate(out):
    rng = np.random.default_rng(SEED)
    g = Gen(out)
    gen_jsonl(g, rng)
    gen_topk_file(g, rng, "topk_e8_k2.safetensors", 8, 2, 2999, ["I64", "I32", "U8", "I16"],
                  [(1, None), (2, None), (8, None), (8, "1.25")])
    gen_topk_file(g, rng, "topk_e64_k8.safetensors", 64, 8, 1237, ["I8", "U16", "U32", "U64"],
                  [(1, None), (8, None), (2, "1.5")], metadata={"format": "pt"})
    # Mixtral-like E=8 k=2; layers 2 and 10 so that numeric (not lexical) layer order matters
    gen_logits_file(g, rng, "logits_f32_e8_k2.safetensors", "F32", 8, 2, 1500, [2, 10],
                    [(1, None), (2, None), (8, "1.0")], metadata={"format": "pt"})
    gen_logits_file(g, rng, "logits_f16_e8_k2.safetensors", "F16", 8, 2, 1500, [0, 1], [(2, None)])
    gen_logits_file(g, rng, "logits_bf16_e8_k2.safetensors", "BF16", 8, 2, 1500, [0, 1],
                    [(2, None), (4, "1.25")])
    gen_logits_file(g, rng, "logits_f64_e8_k2.safetensors", "F64", 8, 2, 300, [0], [(2, None)])
    # Qwen1.5-MoE-like E=60 k=4
    gen_logits_file(g, rng, "logits_f32_e60_k4.safetensors", "F32", 60, 4, 500, [0, 1], [(4, None)])
    gen_logits_file(g, rng, "logits_f16_e60_k4.safetensors", "F16", 60, 4, 500, [0, 1],
                    [(1, None), (4, None)])
    gen_logits_file(g, rng, "logits_bf16_e60_k4.safetensors", "BF16", 60, 4, 500, [0, 1],
                    [(4, None), (4, "1.25")])
    gen_bad(g, rng)
    g.write("cases.json", json.dumps({"cases": g.cases}, indent=2) + "\n")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    assert total < SIZE_BUDGET, f"fixtures are {total} bytes, over budget"
    return total


def compare_trees(a, b):
    diffs = []
    for root in (a, b):
        for d, _, fs in os.walk(root):
            for f in fs:
                rel = os.path.relpath(os.path.join(d, f), root)
                pa, pb = os.path.join(a, rel), os.path.join(b, rel)
                if not (os.path.exists(pa) and os.path.exists(pb)):
                    diffs.append(f"only in one tree: {rel}")
                elif root == a and not filecmp.cmp(pa, pb, shallow=False):
                    diffs.append(f"differs: {rel}")
    return sorted(set(diffs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pg = sub.add_parser("gen", help="regenerate the fixtures")
    pg.add_argument("--out", default=DEFAULT_OUT)
    pg.add_argument("--check", action="store_true", help="compare with the checked-in files instead of writing")
    ph = sub.add_parser("hist", help="print reference route_hist records for one trace")
    ph.add_argument("file")
    ph.add_argument("--experts", type=int)
    ph.add_argument("--topk", type=int)
    ph.add_argument("--ep", type=int, default=1)
    ph.add_argument("--capacity-factor", dest="cf")
    a = ap.parse_args(argv)
    if a.cmd == "hist":
        sys.stdout.write(dumps_records(analyse_file(a.file, a.experts, a.topk, a.ep, a.cf)))
        return 0
    if a.check:
        with tempfile.TemporaryDirectory() as tmp:
            total = generate(tmp)
            diffs = compare_trees(tmp, a.out)
        for d in diffs:
            print(d)
        print(f"{'MISMATCH' if diffs else 'OK'}: {total} bytes of fixtures regenerated and compared")
        return 1 if diffs else 0
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    total = generate(a.out)
    print(f"wrote {len(os.listdir(a.out))} entries, {total} bytes, to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
