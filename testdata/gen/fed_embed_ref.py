#!/usr/bin/env python3
"""Reference fixtures for `fed-embed`, computed with numpy / scikit-learn / PyTorch.

Never calls the Rust code. Data: scikit-learn's bundled digits (1797 x 64,
pixel values 0..16, scaled to [0, 1]) split into three "domains" by a fixed
transform of each 8x8 image:

  domain 0  the image as shipped
  domain 1  the image transposed (a mirrored/rotated view)
  domain 2  the image inverted (1 - x)

Samples are shuffled with numpy.random.default_rng(0xD16175) and dealt out
disjointly: 10 per class of domain 0 as the server's labelled set (FedDISC),
400 per client (client k = domain k), and 100 per domain as the server's
unlabelled public set for FedD3A (`d3a_server`, with its true `domains`).

    .venv/bin/python testdata/gen/fed_embed_ref.py gen           # rewrites testdata/fed-embed/
    .venv/bin/python testdata/gen/fed_embed_ref.py gen --check   # regenerate to a temp dir, byte-compare
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch
from safetensors.numpy import save_file
from scipy.optimize import brentq
from scipy.stats import norm
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata" / "fed-embed"
SEED = 0xD16175


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def i64(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.int64))


def domains_of(x: np.ndarray) -> list[np.ndarray]:
    img = x.reshape(-1, 8, 8) / 16.0
    return [
        img.reshape(-1, 64),
        img.transpose(0, 2, 1).reshape(-1, 64),
        (1.0 - img).reshape(-1, 64),
    ]


def split():
    d = load_digits()
    x, y = d.data, d.target
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(y))
    server = []
    for c in range(10):
        server.extend([i for i in order if y[i] == c][:10])
    rest = [i for i in order if i not in set(server)]
    clients = [rest[k * 400:(k + 1) * 400] for k in range(3)]
    public = [rest[1200 + k * 100:1200 + (k + 1) * 100] for k in range(3)]
    doms = domains_of(x)
    return x, y, doms, np.array(server), clients, public


def subspace(x: np.ndarray, rank: int | None, energy: float | None):
    """Top-r right singular vectors of x (uncentred), numpy SVD in float64."""
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    lam = s**2
    if rank is None:
        share = np.cumsum(lam) / lam.sum()
        rank = int(np.searchsorted(share, energy * (1 - 1e-12)) + 1)
    u = vt[:rank].T
    # Same sign convention as fed-embed (largest |entry| positive); tests
    # compare projections U U^T anyway, which no sign or rotation changes.
    big = np.argmax(np.abs(u), axis=0)
    u = u * np.sign(u[big, np.arange(rank)])
    return u, s[:rank], rank, lam[:rank].sum() / lam.sum()


def d3a(x: np.ndarray, bases: list[np.ndarray], t: float, top_k: int):
    cos = np.stack(
        [np.sqrt(np.clip((np.square(x @ u).sum(1)) / np.square(x).sum(1), 0, 1)) for u in bases], 1
    )
    disc = 1.0 - cos**2
    n, k = disc.shape
    w = np.zeros_like(disc)
    for i in range(n):
        order = np.argsort(disc[i], kind="stable")[:top_k]
        if t == 0:
            best = disc[i, order[0]]
            ties = [j for j in order if disc[i, j] == best]
            w[i, ties] = 1.0 / len(ties)
        else:
            e = np.exp(-(disc[i, order] - disc[i, order[0]]) / t)
            w[i, order] = e / e.sum()
    return w, cos, disc


def tolerance(x, tol):
    return np.mean(np.var(x, axis=0)) * tol


def analytic_gaussian_epsilon(z: float, delta: float) -> float:
    """Balle & Wang 2018, Theorem 8, solved with scipy (independent of ftk's code)."""
    def d(eps):
        return norm.cdf(1 / (2 * z) - eps * z) - math.exp(eps) * norm.cdf(-1 / (2 * z) - eps * z) - delta
    return brentq(d, 0.0, 100.0, xtol=1e-14)


def gen(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    exp = out / "expected"
    exp.mkdir(exist_ok=True)
    x, y, doms, server, clients, public = split()
    cases: dict = {
        "versions": {
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "scipy": scipy.__version__,
            "torch": torch.__version__.split("+")[0],
        }
    }

    # ---- inputs ----------------------------------------------------------
    save_file({"features": f32(doms[0][server]), "labels": i64(y[server])}, out / "server.safetensors")
    cfeat = []
    for k in range(3):
        f = f32(doms[k][clients[k]])
        cfeat.append(f)
        save_file({"features": f, "labels": i64(y[clients[k]])}, out / f"client{k}.safetensors")
    pub_x = f32(np.concatenate([doms[k][public[k]] for k in range(3)]))
    pub_d = i64(np.repeat(np.arange(3), 100))
    save_file({"features": pub_x, "domains": pub_d}, out / "d3a_server.safetensors")

    # ---- FedD3A: subspaces (numpy SVD) -----------------------------------
    bases = []
    cases["subspace"] = []
    for k in range(3):
        for tag, rank, energy in [("r8", 8, None), ("e95", None, 0.95)]:
            u, s, r, share = subspace(cfeat[k].astype(np.float64), rank, energy)
            save_file({"basis": f32(u), "singular_values": f32(s)}, exp / f"subspace_c{k}_{tag}.safetensors")
            cases["subspace"].append({"client": k, "case": tag, "rank": r, "energy": share,
                                      "sigma_r": float(s[-1])})
            if tag == "r8":
                bases.append(u)
                # Gap below the kept subspace, so the subspace is well defined.
                s_all = np.linalg.svd(cfeat[k].astype(np.float64), compute_uv=False)
                assert s_all[7] / s_all[8] > 1.02, (k, s_all[:10])

    # ---- FedD3A: weights (from the numpy bases, stored as inputs) --------
    cases["d3a"] = []
    for t, top_k, tag in [(0.1, 3, "t01"), (0.0, 3, "hard"), (0.05, 2, "t005_top2")]:
        w, cos, disc = d3a(pub_x.astype(np.float64), bases, t, top_k)
        save_file({"weights": f32(w), "similarity": f32(cos), "discrepancy": f32(disc)},
                  exp / f"d3a_{tag}.safetensors")
        own = float(np.mean(np.argmax(w, 1) == pub_d))
        cases["d3a"].append({"case": tag, "temperature": t, "top_k": top_k, "own_domain_top": own})
        if t == 0:
            # Hard selection must not hinge on float rounding: the best and
            # second-best discrepancies differ clearly everywhere.
            srt = np.sort(disc, 1)
            assert np.min(srt[:, 1] - srt[:, 0]) > 1e-5

    # ---- ensemble: teachers = per-domain logistic regressions (PyTorch softmax)
    logits = []
    for k in range(3):
        clf = LogisticRegression(max_iter=2000).fit(cfeat[k], y[clients[k]])
        z = f32(clf.decision_function(pub_x))
        logits.append(z)
        save_file({"logits": z}, out / f"teacher{k}.safetensors")
    w01 = torch.tensor(d3a(pub_x.astype(np.float64), bases, 0.1, 3)[0])
    zs = torch.tensor(np.stack(logits).astype(np.float64))  # [K, N, C]
    for tmp, mode in [(3.0, "probs"), (2.0, "logits")]:
        if mode == "probs":
            p = torch.softmax(zs / tmp, dim=-1)  # [K, N, C]
            soft = torch.einsum("nk,knc->nc", w01, p)
        else:
            soft = torch.softmax(torch.einsum("nk,knc->nc", w01, zs) / tmp, dim=-1)
        save_file({"soft_labels": f32(soft.numpy())}, exp / f"ensemble_{mode}.safetensors")
    uni = torch.softmax(zs / 1.0, dim=-1).mean(0)
    save_file({"soft_labels": f32(uni.numpy())}, exp / "ensemble_uniform.safetensors")

    # ---- FedDISC: prototypes and pseudo-labels ----------------------------
    sx = doms[0][server].astype(np.float32).astype(np.float64)
    protos = np.stack([sx[y[server] == c].mean(0) for c in range(10)])
    save_file({"prototypes": f32(protos), "counts": i64(np.bincount(y[server], minlength=10))},
              exp / "prototypes.safetensors")
    cases["pseudo_label"] = []
    pf = f32(protos).astype(np.float64)
    for k in range(3):
        f = cfeat[k].astype(np.float64)
        for metric in ["euclidean", "cosine"]:
            if metric == "euclidean":
                score = -((f[:, None, :] - pf[None, :, :]) ** 2).sum(-1)
            else:
                score = (f @ pf.T) / np.outer(np.linalg.norm(f, axis=1), np.linalg.norm(pf, axis=1))
            lab = np.argmax(score, 1)
            srt = np.sort(score, 1)
            gap = (srt[:, -1] - srt[:, -2]) / np.maximum(np.abs(srt[:, -1]), 1e-12)
            conf = torch.softmax(torch.tensor(score), dim=1).numpy()[np.arange(len(lab)), lab]
            # Samples whose top two classes are within 1e-5 (relative) are
            # "ambiguous": float32 vs float64 may pick either.
            amb = gap < 1e-5
            save_file({"labels": i64(lab), "confidence": f32(conf), "ambiguous": i64(amb)},
                      exp / f"pseudo_c{k}_{metric}.safetensors")
            cases["pseudo_label"].append({"client": k, "metric": metric, "ambiguous": int(amb.sum()),
                                          "accuracy": float(np.mean(lab == y[clients[k]]))})

    # ---- FedDISC: k-means with fixed initial centroids (sklearn) -----------
    rng = np.random.default_rng(SEED + 1)
    cases["kmeans_fixed"] = []
    for k_cl, tag in [(8, "c0_k8"), (5, "c2_k5")]:
        cl = 0 if tag.startswith("c0") else 2
        X = cfeat[cl]
        init = X[rng.choice(len(X), k_cl, replace=False)].copy()
        save_file({"centroids": f32(init)}, out / f"kmeans_init_{tag}.safetensors")
        res = {}
        for dt in (np.float32, np.float64):
            km = KMeans(n_clusters=k_cl, init=init.astype(dt), n_init=1, max_iter=100, tol=1e-4,
                        algorithm="lloyd").fit(X.astype(dt))
            res[dt] = km
        a, b = res[np.float32], res[np.float64]
        # float32 and float64 sklearn agree, so the fixture does not hinge on rounding.
        assert np.array_equal(a.labels_, b.labels_) and a.n_iter_ == b.n_iter_, tag
        save_file({"centroids": f32(b.cluster_centers_), "labels": i64(b.labels_)},
                  exp / f"kmeans_fixed_{tag}.safetensors")
        cases["kmeans_fixed"].append({"case": tag, "client": cl, "k": k_cl, "inertia": float(b.inertia_),
                                      "n_iter": int(b.n_iter_)})
    # k-means++: not reproducible across libraries; record sklearn's inertia
    # over 20 seeds (n_init=1) for a distributional comparison.
    km_in = [float(KMeans(n_clusters=8, n_init=1, max_iter=100, random_state=s).fit(cfeat[0].astype(np.float64)).inertia_)
             for s in range(20)]
    cases["kmeans_pp_c0_k8"] = {"sklearn_inertia_seeds_0_19": km_in, "median": float(np.median(km_in)),
                                "min": min(km_in), "max": max(km_in)}

    # ---- noise: epsilon of the Gaussian mechanism (scipy) ------------------
    cases["noise"] = []
    for clip, sigma, delta in [(4.0, 8.0, 1e-5), (1.0, 10.0, 1e-6)]:
        z = sigma / (2 * clip)
        cases["noise"].append({"clip": clip, "sigma": sigma, "delta": delta,
                               "epsilon": analytic_gaussian_epsilon(z, delta)})

    # ---- FedAPT adapt-weights (PyTorch, as clip_queryv2.CustomCLIP_server) --
    g = torch.Generator().manual_seed(SEED)
    nd_, m_, dim_, c_ = 3, 4, 16, 5
    keys = torch.rand([nd_, m_, dim_], generator=g, dtype=torch.float64)
    ctx = torch.randn([c_, m_, dim_], generator=g, dtype=torch.float64) * 0.02
    ctx1 = torch.randn([m_, dim_], generator=g, dtype=torch.float64) * 0.02
    # Adapter: a domain classifier (least squares on one-hot domains) over the client features.
    feats = torch.tensor(np.concatenate([c[:50] for c in cfeat]).astype(np.float64))
    dom_t = torch.tensor(np.repeat(np.arange(3), 50))
    onehot = torch.nn.functional.one_hot(dom_t, 3).double()
    wls = torch.linalg.lstsq(feats, onehot).solution.T.contiguous()  # [3, 64]
    W = wls
    save_file({"keys": f32(keys.numpy())}, out / "apt_keys.safetensors")
    save_file({"ctx": f32(ctx.numpy())}, out / "apt_ctx_csc.safetensors")
    save_file({"ctx": f32(ctx1.numpy())}, out / "apt_ctx.safetensors")
    save_file({"weight": f32(W.numpy())}, out / "apt_adapter.safetensors")
    save_file({"features": f32(feats.numpy()), "domains": i64(dom_t.numpy())}, out / "apt_features.safetensors")
    kf, cf, c1, Wf, ff = (torch.tensor(f32(t.numpy())).double() for t in (keys, ctx, ctx1, W, feats))
    z = ff @ Wf.T
    zt = (z - z.mean(dim=1, keepdim=True)) / torch.sqrt(z.var(dim=1, keepdim=True))  # unbiased
    wt = torch.softmax(zt / 0.01, dim=1)
    mult = 1 + torch.einsum("nd,dmk->nmk", wt, kf)
    save_file({"weights": f32(wt.numpy()), "scores": f32(z.numpy()),
               "prompts": f32((cf[None] * mult[:, None]).numpy())}, exp / "apt_csc.safetensors")
    save_file({"weights": f32(wt.numpy()), "scores": f32(z.numpy()),
               "prompts": f32((c1[None] * mult).numpy())}, exp / "apt_generic.safetensors")
    wt1 = torch.softmax(zt / 1.0, dim=1)
    mult1 = 1 + torch.einsum("nd,dmk->nmk", wt1, kf)
    save_file({"weights": f32(wt1.numpy()), "scores": f32(z.numpy()),
               "prompts": f32((c1[None] * mult1).numpy())}, exp / "apt_generic_t1.safetensors")
    cases["apt"] = {"own_domain_top": float(np.mean(wt.argmax(1).numpy() == dom_t.numpy()))}
    # Standardised scores away from ties at t = 0.01 would still be smooth; record the
    # largest top weight to show weights are near one-hot as the authors intend.
    cases["apt"]["mean_top_weight"] = float(wt.max(1).values.mean())

    # ---- pFedBayesPT prompt-sample (PyTorch MLP, explicit noise) -----------
    torch.manual_seed(SEED % (2**31))
    M, N = 6, 120
    nd, L, P = 8, 4, 8
    bf = torch.tensor(f32(cfeat[1][:N])).double()
    save_file({"features": f32(bf.numpy())}, out / "bayes_features.safetensors")
    for tag, outk in [("mean", 1), ("mean_logvar", 2)]:
        net = torch.nn.Sequential(
            torch.nn.Linear(64 + nd, 48), torch.nn.ReLU(),
            torch.nn.Linear(48, 32), torch.nn.Tanh(),
            torch.nn.Linear(32, outk * L * P),
        ).double()
        with torch.no_grad():
            if tag == "mean_logvar":
                net[4].bias[L * P:] -= 2.0  # small explicit-layer variances
        sd = {k: f32(v.detach().numpy()) for k, v in net.state_dict().items()}
        save_file(sd, out / f"bayes_gen_{tag}.safetensors")
        arch = {"noise_dim": nd, "prompt_shape": [L, P], "output": tag,
                "layers": [{"weight": "0.weight", "bias": "0.bias", "activation": "relu"},
                           {"weight": "2.weight", "bias": "2.bias", "activation": "tanh"},
                           {"weight": "4.weight", "bias": "4.bias"}]}
        (out / f"bayes_arch_{tag}.json").write_text(json.dumps(arch, indent=1) + "\n")
        eps = torch.randn([M, N, nd], dtype=torch.float64)
        eta = torch.randn([M, N, L * P], dtype=torch.float64)
        noise = {"eps": f32(eps.numpy())}
        if tag == "mean_logvar":
            noise["eta"] = f32(eta.numpy())
        save_file(noise, out / f"bayes_noise_{tag}.safetensors")
        net32 = net  # weights were rounded to f32 above; reload them so both sides agree
        net32.load_state_dict({k: torch.tensor(v).double() for k, v in sd.items()})
        with torch.no_grad():
            samples = []
            for m in range(M):
                psi = net32(torch.cat([bf, torch.tensor(f32(eps[m].numpy())).double()], 1))
                if tag == "mean":
                    p = psi
                else:
                    mu, lv = psi[:, :L * P], psi[:, L * P:]
                    p = mu + torch.exp(0.5 * lv) * torch.tensor(f32(eta[m].numpy())).double()
                samples.append(p.reshape(N, L, P))
            s = torch.stack(samples)
        save_file({"mean": f32(s.mean(0).numpy()), "var": f32(s.var(0).numpy())},
                  exp / f"bayes_{tag}.safetensors")

    (exp / "cases.json").write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 3_000_000, total
    print(f"wrote {out} ({total} bytes)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["gen"])
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if not a.check:
        if OUT.exists():
            shutil.rmtree(OUT)
        gen(OUT)
        return 0
    with tempfile.TemporaryDirectory() as t:
        gen(Path(t) / "fed-embed")
        cmp = filecmp.dircmp(Path(t) / "fed-embed", OUT)
        bad = []

        def walk(c, pre=""):
            bad.extend(pre + n for n in c.diff_files + c.left_only + c.right_only)
            for n, sub in c.subdirs.items():
                walk(sub, pre + n + "/")
        walk(cmp)
        if bad:
            print("differs:", bad)
            return 1
    print("fixtures match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
