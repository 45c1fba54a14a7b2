#!/usr/bin/env python3
"""Reference fixtures for fed-aggregate, produced by Flower's own strategy code.

Every expected output under testdata/fed-aggregate/expected/ is what Flower's
`Strategy.aggregate_fit` returns for the checked-in client files (FedRA: a
numpy port of leondada/FedRA `Server.agg_range_fill`, which is not in Flower).
Stateful strategies run several rounds on one strategy object, exactly as a
Flower server would.

    .venv/bin/python testdata/gen/fed_aggregate_ref.py gen           # rewrite testdata/fed-aggregate/
    .venv/bin/python testdata/gen/fed_aggregate_ref.py gen --check   # regenerate to a temp dir, byte-compare

Needs numpy, safetensors and flwr (testdata/gen/requirements.txt).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

warnings.filterwarnings("ignore")

import flwr  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import (  # noqa: E402
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from flwr.server.strategy.aggregate import aggregate_krum  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata" / "fed-aggregate"
SEED = 0xFED2026

# Tensor names and shapes of the synthetic model (a 0-d scalar included).
SHAPES = {
    "layers.0.weight": (24, 16),
    "layers.0.bias": (16,),
    "layers.1.weight": (16, 10),
    "layers.1.bias": (10,),
    "head.weight": (10, 3),
    "scale": (),
}
NAMES = sorted(SHAPES)


# --------------------------------------------------------------------------
# Flower plumbing
# --------------------------------------------------------------------------

def fitres(arrays: dict[str, np.ndarray], n: int) -> tuple[None, FitRes]:
    params = ndarrays_to_parameters([arrays[k] for k in sorted(arrays)])
    return None, FitRes(status=Status(code=Code.OK, message=""), parameters=params,
                        num_examples=n, metrics={})


def to_dict(names: list[str], params) -> dict[str, np.ndarray]:
    arrs = parameters_to_ndarrays(params)
    return {k: np.asarray(a) for k, a in zip(names, arrs, strict=True)}


def run_fit(strategy, rnd: int, clients: list[tuple[dict, int]]) -> dict[str, np.ndarray]:
    names = sorted(clients[0][0])
    res = [fitres(c, n) for c, n in clients]
    params, _ = strategy.aggregate_fit(rnd, res, [])
    assert params is not None, "Flower returned no parameters"
    return to_dict(names, params)


def params_of(d: dict[str, np.ndarray]):
    return ndarrays_to_parameters([d[k] for k in sorted(d)])


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def make_inputs(rng: np.random.Generator):
    g0 = {k: np.asarray(rng.normal(0.0, 1.0, s), dtype=np.float32) for k, s in SHAPES.items()}
    pools = {}
    # Round 1: 9 clients; c7 and c8 are "malicious" (far away) for the robust rules.
    r1 = []
    for i in range(9):
        if i >= 7:
            upd = {k: rng.normal(3.0 + i, 2.0, s) for k, s in SHAPES.items()}
        else:
            mu = rng.normal(0.0, 0.05)
            upd = {k: rng.normal(mu, 0.1, s) for k, s in SHAPES.items()}
        c = {k: (g0[k] + upd[k]).astype(np.float32) for k in SHAPES}
        r1.append((f"r1_c{i}", c, int(rng.integers(10, 500))))
    pools[1] = r1
    for r in (2, 3):
        pr = []
        shift = rng.normal(0.0, 0.2)
        for i in range(5):
            c = {k: (g0[k] + rng.normal(shift, 0.15, s)).astype(np.float32) for k, s in SHAPES.items()}
            pr.append((f"r{r}_c{i}", c, int(rng.integers(10, 500))))
        pools[r] = pr
    return g0, pools


def write_client(d: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    # np.array (not ascontiguousarray, which turns 0-d into 1-d) keeps scalars 0-d.
    save_file({k: np.array(v, order="C") for k, v in arrays.items()}, str(d / "clients" / f"{name}.safetensors"))


def write_manifest(d: Path, name: str, clients: list[tuple[str, dict, int]]) -> str:
    lines = [json.dumps({"kind": "client_update", "cid": cid, "path": f"clients/{cid}.safetensors",
                         "num_examples": n}) for cid, _, n in clients]
    (d / name).write_text("\n".join(lines) + "\n")
    return name


def save_expected(d: Path, case: str, rnd: int, arrays: dict[str, np.ndarray]) -> str:
    rel = f"expected/{case}_r{rnd}.safetensors"
    # float64 keeps Flower's values exactly (its FedOpt results are float64 from
    # the bias-corrected step on).
    save_file({k: np.array(v, dtype=np.float64, order="C") for k, v in arrays.items()}, str(d / rel))
    return rel


# --------------------------------------------------------------------------
# Independent checks that the fixtures are well-conditioned
# --------------------------------------------------------------------------

def flat(c: dict) -> np.ndarray:
    return np.concatenate([np.asarray(c[k], dtype=np.float64).ravel() for k in sorted(c)])


def krum_scores64(vecs: list[np.ndarray], f: int) -> np.ndarray:
    n = len(vecs)
    d = np.array([[np.sum((a - b) ** 2) for b in vecs] for a in vecs])
    k = max(1, n - f - 2)
    return np.array([np.sort(d[i])[1:k + 1].sum() for i in range(n)])


def check_krum_margin(clients: list[dict], f: int, keep: int) -> None:
    """Selections must not hinge on float32 rounding: scores of the last kept
    and first dropped client differ by > 1e-4 relative."""
    s = np.sort(krum_scores64([flat(c) for c in clients], f))
    k = max(keep, 1)
    if k < len(s):
        assert (s[k] - s[k - 1]) / s[k] > 1e-4, f"Krum score gap too small: {s}"


def check_bulyan_ties(selected: list[dict], beta: int) -> None:
    for k in NAMES:
        a = np.array([np.asarray(c[k], dtype=np.float32) for c in selected])
        med = np.median(a, axis=0)
        dist = np.sort(np.abs(a - med), axis=0)
        if beta < len(selected):
            gap = dist[beta] - dist[beta - 1]
            assert np.all(gap > 1e-6 * (np.abs(med) + 1)), f"Bulyan boundary tie in {k}"


def check_yogi_signs(v_prev: dict, delta: dict) -> None:
    for k in delta:
        vp = np.asarray(v_prev[k], np.float64)
        d2 = np.asarray(delta[k], np.float64) ** 2
        gap = np.abs(vp - d2)
        assert np.all((gap > 1e-4 * np.maximum(vp, d2)) | (np.maximum(vp, d2) == 0)), f"Yogi sign near-tie in {k}"


# --------------------------------------------------------------------------
# FedRA (leondada/FedRA server.py agg_range_fill, ported to numpy)
# --------------------------------------------------------------------------

FEDRA_L = 6
FEDRA_SUFFIX = ["attn.proj.lora_A.default.weight", "attn.proj.lora_B.default.weight",
                "mlp.fc2.lora_A.default.weight", "mlp.fc2.lora_B.default.weight"]
FEDRA_SHAPES = {"attn.proj.lora_A.default.weight": (4, 12), "attn.proj.lora_B.default.weight": (12, 4),
                "mlp.fc2.lora_A.default.weight": (4, 20), "mlp.fc2.lora_B.default.weight": (12, 4)}


def fedra_case(d: Path, rng: np.random.Generator, cases: list) -> None:
    caps = [6, 4, 3, 2]
    n = len(caps)
    # The public code's draw: np.random.choice(range(L), L_i, replace=False) per client.
    # Redraw until exactly one layer is held by nobody (exercises "keep the global value").
    while True:
        A = np.zeros((n, FEDRA_L), dtype=int)
        for i in range(n):
            A[i, rng.choice(list(range(FEDRA_L)), caps[i], replace=False)] = 1
        A[0] = 0
        A[0, rng.choice(list(range(FEDRA_L)), 5, replace=False)] = 1  # client 0 holds 5 of 6
        if np.sum(A.sum(0) == 0) == 1:
            break
    caps[0] = 5
    glob = {}
    for l in range(FEDRA_L):
        glob[f"blocks.{l}.attn.proj.weight"] = rng.normal(0, 1, (12, 12)).astype(np.float32)  # frozen base
        for s in FEDRA_SUFFIX:
            glob[f"blocks.{l}.{s}"] = rng.normal(0, 0.1, FEDRA_SHAPES[s]).astype(np.float32)
    glob["head.weight"] = rng.normal(0, 1, (5, 12)).astype(np.float32)
    glob["head.bias"] = rng.normal(0, 1, (5,)).astype(np.float32)
    glob["norm.weight"] = rng.normal(1, 0.1, (12,)).astype(np.float32)
    glob["Prompt_Tokens"] = np.zeros((1, 0, 12), dtype=np.float32)
    save_file(glob, str(d / "fedra_global.safetensors"))
    models = []
    lines = []
    for i in range(n):
        held = np.where(A[i] == 1)[0]
        m = {}
        for t, j in enumerate(held):  # local block t <- global block j (get_para_range)
            for s in FEDRA_SUFFIX:
                m[f"blocks.{t}.{s}"] = (glob[f"blocks.{j}.{s}"] + rng.normal(0, 0.05, FEDRA_SHAPES[s])).astype(np.float32)
        for k in ("head.weight", "head.bias", "norm.weight"):
            m[k] = (glob[k] + rng.normal(0, 0.05, glob[k].shape)).astype(np.float32)
        m["Prompt_Tokens"] = np.zeros((1, 0, 12), dtype=np.float32)
        models.append(m)
        save_file(m, str(d / "clients" / f"fedra_c{i}.safetensors"))
        lines.append(json.dumps({"kind": "client_update", "cid": str(i), "path": f"clients/fedra_c{i}.safetensors",
                                 "num_examples": int(rng.integers(10, 500))}))
    (d / "m_fedra.jsonl").write_text("\n".join(lines) + "\n")
    alloc = [json.dumps({"kind": "fedra_alloc", "round": 1, "client": i, "cid": str(i), "num_layers": FEDRA_L,
                         "capacity": int(A[i].sum()), "layers": [int(x) for x in np.where(A[i] == 1)[0]],
                         "mask": [int(x) for x in A[i]]}) for i in range(n)]
    (d / "fedra_alloc.jsonl").write_text("\n".join(alloc) + "\n")
    # agg_range_fill
    this_round = list(range(n))
    indexs = A.copy()
    for i in range(1, FEDRA_L):
        indexs[:, i] += indexs[:, i - 1]
    average = {}
    for k in ("Prompt_Tokens", "head.weight", "head.bias", "norm.weight"):
        average[k] = sum(models[i][k] for i in this_round) / len(this_round)
    for l in range(FEDRA_L):
        acc = {s: 0 for s in FEDRA_SUFFIX}
        num = 0
        for j in this_round:
            if A[:, l][j] == 1:
                num += 1
                for s in FEDRA_SUFFIX:
                    acc[s] = acc[s] + models[j][f"blocks.{indexs[:, l][j] - 1}.{s}"]
        for s in FEDRA_SUFFIX:
            average[f"blocks.{l}.{s}"] = acc[s] / num if num > 0 else glob[f"blocks.{l}.{s}"]
    # load_state_dict(strict=False): everything not averaged keeps its global value.
    result = dict(glob)
    result.update(average)
    uncovered = [int(l) for l in np.where(A.sum(0) == 0)[0]]
    cases.append({"name": "fedra", "strategy": "fedra",
                  "flags": ["--alloc", "fedra_alloc.jsonl", "--layer-pattern", r"blocks\.(\d+)\."],
                  "global": "fedra_global.safetensors", "state": False,
                  "rounds": [{"manifest": "m_fedra.jsonl", "expected": save_expected(d, "fedra", 1, result)}],
                  "note": f"4 clients with local block numbering; layer(s) {uncovered} held by nobody keep the global value",
                  "reference": "leondada/FedRA server.py agg_range_fill (numpy port)"})


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

def gen(d: Path) -> None:
    rng = np.random.default_rng(SEED)
    (d / "clients").mkdir(parents=True)
    (d / "expected").mkdir()
    g0, pools = make_inputs(rng)
    save_file(g0, str(d / "global0.safetensors"))
    for pool in pools.values():
        for cid, c, _ in pool:
            write_client(d, cid, c)
    m9 = write_manifest(d, "m_r1_9.jsonl", pools[1])
    m8 = write_manifest(d, "m_r1_8.jsonl", pools[1][:8])
    m7 = write_manifest(d, "m_r1_7.jsonl", pools[1][:7])
    m5 = write_manifest(d, "m_r1_5.jsonl", pools[1][:5])
    mr = {1: m5, 2: write_manifest(d, "m_r2_5.jsonl", pools[2]), 3: write_manifest(d, "m_r3_5.jsonl", pools[3])}
    cl = lambda pool: [(c, n) for _, c, n in pool]  # noqa: E731
    cases = []

    def single(name, strategy_name, flags, strat, manifest, pool, note, global_=None):
        out = run_fit(strat, 1, cl(pool))
        cases.append({"name": name, "strategy": strategy_name, "flags": flags, "global": global_,
                      "state": False, "rounds": [{"manifest": manifest, "expected": save_expected(d, name, 1, out)}],
                      "note": note, "reference": f"flwr {flwr.__version__} {type(strat).__name__}.aggregate_fit"})
        return out

    g0p = params_of(g0)
    single("fedavg", "fedavg", [], FedAvg(), m9, pools[1], "in-place weighted mean (FedAvg inplace=True)")
    single("fedavg_8", "fedavg", [], FedAvg(inplace=False), m8, pools[1][:8], "FedAvg inplace=False")
    single("fedprox", "fedprox", [], FedProx(proximal_mu=0.1), m7, pools[1][:7], "server side of FedProx = FedAvg")
    single("fedavgm_plain", "fedavgm", [], FedAvgM(), m8, pools[1][:8], "lr 1, momentum 0: no server step")
    single("fedmedian_9", "fedmedian", [], FedMedian(), m9, pools[1], "odd count")
    single("fedmedian_8", "fedmedian", [], FedMedian(), m8, pools[1][:8], "even count: mean of the two middle")
    single("fedtrimmedavg", "fedtrimmedavg", [], FedTrimmedAvg(), m9, pools[1], "beta 0.2: cut 1 of 9 each end")
    single("fedtrimmedavg_03", "fedtrimmedavg", ["--trim-beta", "0.3"], FedTrimmedAvg(beta=0.3), m9, pools[1],
           "beta 0.3: cut 2 of 9 each end")
    check_krum_margin([c for _, c, _ in pools[1]], 2, 0)
    single("krum", "krum", ["--num-malicious", "2"], Krum(num_malicious_clients=2), m9, pools[1],
           "returns the best-scored client")
    check_krum_margin([c for _, c, _ in pools[1]], 2, 3)
    single("multikrum", "multikrum", ["--num-malicious", "2", "--to-keep", "3"],
           Krum(num_malicious_clients=2, num_clients_to_keep=3), m9, pools[1], "weighted mean of the 3 best")
    single("krum_f0_keep5", "krum", ["--num-malicious", "0", "--to-keep", "5"],
           Krum(num_malicious_clients=0, num_clients_to_keep=5), m8, pools[1][:8], "krum with --to-keep is MultiKrum")
    # Bulyan: n=9, f=1 (9 >= 7): theta 7 Krum rounds, beta 5.
    sel = []
    rem = [c for _, c, _ in pools[1]]
    for _ in range(9 - 2):
        s = krum_scores64([flat(c) for c in rem], 1)
        order = np.sort(s)
        # An exact tie (two mutually nearest clients when only one distance is
        # summed) is resolved the same way everywhere: the first in order.
        gap = (order[1] - order[0]) / order[1]
        assert gap == 0 or gap > 1e-4, "Bulyan Krum step near-tie"
        sel.append(rem.pop(int(np.argmin(s))))
    check_bulyan_ties(sel, 9 - 4)
    single("bulyan", "bulyan", ["--num-malicious", "1"],
           Bulyan(num_malicious_clients=1, first_aggregation_rule=aggregate_krum, to_keep=0), m9, pools[1],
           "7 Krum selections, then mean of the 5 values closest to the median")
    single("fedavgm_step", "fedavgm", ["--server-lr", "0.7"], FedAvgM(initial_parameters=g0p, server_learning_rate=0.7),
           m8, pools[1][:8], "lr 0.7, no momentum: stateless server step", global_="global0.safetensors")

    # DP (server-side fixed clipping) with noise 0: clip each update against global0.
    upd_norms = sorted(np.linalg.norm(flat(c) - flat(g0)) for _, c, _ in pools[1][:7])
    clip = float(np.float32(upd_norms[3]) * 1.0001)  # about half the clients get clipped
    dpw = DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=0.0, clipping_norm=clip,
                                                     num_sampled_clients=7)
    dpw.current_round_params = [g0[k] for k in NAMES]
    flower_dp = run_fit(dpw, 1, cl(pools[1][:7]))
    # Flower quirk: clip_inputs_inplace does `array *= s` on np.subtract(x, y),
    # which for a 0-d tensor is a numpy scalar, so the scalar's update is never
    # clipped (its norm still counts). ftk clips every tensor: for 0-d tensors
    # the expected value is the clipped weighted mean, computed here.
    exp = dict(flower_dp)
    tot = sum(n for _, _, n in pools[1][:7])
    for k in NAMES:
        if np.ndim(g0[k]) == 0:
            acc = 0.0
            for _, c, n in pools[1][:7]:
                norm = np.linalg.norm(flat(c) - flat(g0))
                sc = min(1.0, clip / norm)
                acc += n * (np.float64(g0[k]) + sc * (np.float64(c[k]) - np.float64(g0[k])))
            exp[k] = np.array(acc / tot)
            assert abs(exp[k] - flower_dp[k]) > 1e-4, "Flower now clips 0-d tensors: drop this deviation"
    cases.append({"name": "dp_fedavg_z0", "strategy": "fedavg",
                  "flags": ["--clip-norm", repr(clip), "--noise-multiplier", "0"],
                  "global": "global0.safetensors", "state": False,
                  "rounds": [{"manifest": m7, "expected": save_expected(d, "dp_fedavg_z0", 1, exp)}],
                  "deviations": {"scale": "0-d tensor: Flower leaves its update unclipped (numpy-scalar in-place "
                                 "multiply); expected = clipped weighted mean (ftk's rule)",
                                 "scale_flower": float(flower_dp["scale"])},
                  "note": f"DifferentialPrivacyServerSideFixedClipping(FedAvg), C={clip}, z=0; 3 of 7 clients clipped",
                  "reference": f"flwr {flwr.__version__} DifferentialPrivacyServerSideFixedClipping.aggregate_fit"})

    # Multi-round, stateful: one strategy object across 3 rounds; each round's
    # global is the previous round's result.
    rpool = {1: pools[1][:5], 2: pools[2], 3: pools[3]}  # what m_r{r}_5.jsonl lists

    def multi(name, strategy_name, flags, make, rounds=3):
        strat = make(g0p)
        rr = []
        glob = g0
        m_prev = v_prev = None
        for r in range(1, rounds + 1):
            if strategy_name == "fedyogi":
                avg = {k: sum(np.float64(n) * c[k] for _, c, n in rpool[r]) / sum(n for _, _, n in rpool[r])
                       for k in NAMES}
                delta = {k: avg[k] - glob[k] for k in NAMES}
                if v_prev is not None:
                    check_yogi_signs(v_prev, delta)
            out = run_fit(strat, r, cl(rpool[r]))
            if strategy_name == "fedyogi":
                v_prev = {k: v for k, v in zip(NAMES, strat.v_t, strict=True)}
            rr.append({"manifest": mr[r], "expected": save_expected(d, name, r, out)})
            glob = out
        cases.append({"name": name, "strategy": strategy_name, "flags": flags, "global": "global0.safetensors",
                      "state": True, "rounds": rr,
                      "note": "3 rounds on one Flower strategy object; round r's global is round r-1's result",
                      "reference": f"flwr {flwr.__version__} {type(strat).__name__}.aggregate_fit"})

    multi("fedavgm_momentum", "fedavgm", ["--server-lr", "0.5", "--server-momentum", "0.9"],
          lambda p: FedAvgM(initial_parameters=p, server_learning_rate=0.5, server_momentum=0.9))
    multi("fedadam", "fedadam", [], lambda p: FedAdam(initial_parameters=p))
    multi("fedadam_custom", "fedadam", ["--eta", "0.05", "--beta1", "0.8", "--beta2", "0.95", "--tau", "0.001"],
          lambda p: FedAdam(initial_parameters=p, eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3))
    multi("fedyogi", "fedyogi", [], lambda p: FedYogi(initial_parameters=p))
    multi("fedadagrad", "fedadagrad", [], lambda p: FedAdagrad(initial_parameters=p))

    # Integer tensor (a step counter): Flower's in-place FedAvg zeroes it; ftk
    # returns the weighted mean rounded to the nearest integer (documented).
    ipool = []
    for i in range(3):
        c = {k: (g0[k] + rng.normal(0, 0.1, s)).astype(np.float32) for k, s in SHAPES.items()}
        c["step"] = np.array([100 + 7 * i], dtype=np.int64)
        ipool.append((f"int_c{i}", c, [30, 50, 70][i]))
        write_client(d, f"int_c{i}", c)
    mi = write_manifest(d, "m_int.jsonl", ipool)
    flower = run_fit(FedAvg(), 1, cl(ipool))
    assert flower["step"][0] == 0, "Flower's in-place FedAvg zeroes integer tensors"
    wmean = sum(n * int(c["step"][0]) for _, c, n in ipool) / sum(n for _, _, n in ipool)
    assert abs(wmean - np.floor(wmean) - 0.5) > 1e-9
    exp = dict(flower)
    exp["step"] = np.array([np.floor(wmean + 0.5)], dtype=np.float64)
    cases.append({"name": "fedavg_int", "strategy": "fedavg", "flags": [], "global": None, "state": False,
                  "rounds": [{"manifest": mi, "expected": save_expected(d, "fedavg_int", 1, exp)}],
                  "int_tensors": {"step": {"flower": 0, "ftk": float(exp["step"][0]), "weighted_mean": wmean}},
                  "note": "float tensors from Flower; 'step' (int64) is the documented ftk rule: weighted mean rounded",
                  "reference": f"flwr {flwr.__version__} FedAvg.aggregate_fit"})

    fedra_case(d, rng, cases)
    meta = {"flwr": flwr.__version__, "numpy": np.__version__, "seed": SEED, "cases": cases}
    (d / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert total < 3 << 20, f"fixtures are {total} bytes"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["gen"])
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.check:
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t) / "fed-aggregate"
            gen(tmp)
            bad = []
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    q = OUT / p.relative_to(tmp)
                    if not q.exists() or not filecmp.cmp(p, q, shallow=False):
                        bad.append(str(p.relative_to(tmp)))
            if bad:
                print("differs:", *bad, sep="\n  ")
                return 1
            print("fed-aggregate fixtures: identical")
            return 0
    if OUT.exists():
        shutil.rmtree(OUT)
    gen(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
