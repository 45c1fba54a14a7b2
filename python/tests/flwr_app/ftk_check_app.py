"""A small Flower app for checking ftk.flwr against Flower itself.

ClientApp: multi-output linear regression trained by a few steps of full-batch
gradient descent on synthetic data of its own partition (NumPy only, so no
torch). Everything a client returns is a function of (partition, arrays, config),
so the same grid can run one strategy natively, then ftk-backed, and the two
runs see the same client behaviour.

ServerApp: for each named case, runs `num-rounds` rounds with the native
strategy and then with FtkStrategy around a fresh, identical instance, saving
the global model before and after every round to OUT/<case>/<native|ftk>/round-R.npz.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as fs

D_IN, D_OUT = 32, 16


def partition_data(pid: int):
    rng = np.random.default_rng(1000 + pid)
    n = 24 + 9 * pid
    x = rng.normal(size=(n, D_IN)).astype(np.float32)
    w_true = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
    if pid == 0:
        # One outlying client so that Krum/Bulyan/median have something to reject.
        w_true *= 6.0
    y = x @ w_true + 0.1 * rng.normal(size=(n, D_OUT)).astype(np.float32)
    return x, y


def initial_arrays(seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {
            "fc.weight": Array(rng.normal(scale=0.1, size=(D_IN, D_OUT)).astype(np.float32)),
            "fc.bias": Array(np.zeros(D_OUT, dtype=np.float32)),
        }
    )


client_app = ClientApp()


def _train(msg: Message, context: Context):
    pid = int(context.node_config["partition-id"])
    x, y = partition_data(pid)
    arrays = msg.content["arrays"]
    cfg = msg.content["config"]
    w = arrays["fc.weight"].numpy().copy()
    b = arrays["fc.bias"].numpy().copy()
    w0, b0 = w.copy(), b.copy()
    mu = float(cfg.get("proximal-mu", 0.0))
    lr = 0.05
    for _ in range(5):
        err = x @ w + b - y
        gw = x.T @ err / len(x) + mu * (w - w0)
        gb = err.mean(axis=0) + mu * (b - b0)
        w -= lr * gw
        b -= lr * gb
    loss = float(np.mean((x @ w + b - y) ** 2))
    out = ArrayRecord({"fc.weight": Array(w.astype(np.float32)), "fc.bias": Array(b.astype(np.float32))})
    # A fractional weight under another key, for weighted_by_key cases.
    metrics = MetricRecord({"num-examples": len(x), "frac-weight": 0.5 * len(x) + 0.25, "train-loss": loss})
    return out, metrics, len(x)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    out, metrics, _ = _train(msg, context)
    return Message(content=RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    x, y = partition_data(pid)
    a = msg.content["arrays"]
    loss = float(np.mean((x @ a["fc.weight"].numpy() + a["fc.bias"].numpy() - y) ** 2))
    m = MetricRecord({"num-examples": len(x), "frac-weight": 0.5 * len(x) + 0.25, "eval-loss": loss})
    return Message(content=RecordDict({"metrics": m}), reply_to=msg)


def make_strategy(case: str, n: int, fraction_evaluate: float = 1.0):
    """The native Flower strategy of a case (a fresh instance each call)."""
    common = dict(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n, fraction_evaluate=fraction_evaluate)
    if case == "fedavg":
        return fs.FedAvg(**common)
    if case == "fedavg-fracweight":
        return fs.FedAvg(**common, weighted_by_key="frac-weight")
    if case == "fedprox":
        return fs.FedProx(**common, proximal_mu=0.1)
    if case == "fedavgm":
        return fs.FedAvgM(**common, server_learning_rate=0.8, server_momentum=0.9)
    if case == "fedadam":
        # Fractional weights under another key, with optimiser state across rounds.
        return fs.FedAdam(**common, eta=0.05, weighted_by_key="frac-weight")
    if case == "fedyogi":
        return fs.FedYogi(**common, eta=0.05)
    if case == "fedadagrad":
        return fs.FedAdagrad(**common, eta=0.05)
    if case == "fedmedian":
        return fs.FedMedian(**common)
    if case == "fedtrimmedavg":
        return fs.FedTrimmedAvg(**common, beta=0.2)
    if case == "krum":
        return fs.Krum(**common, num_malicious_nodes=1)
    if case == "multikrum":
        return fs.MultiKrum(**common, num_malicious_nodes=1, num_nodes_to_select=3)
    if case == "bulyan":
        return fs.Bulyan(**common, num_malicious_nodes=1)
    if case == "dp-fixed":
        return fs.DifferentialPrivacyServerSideFixedClipping(fs.FedAvg(**common), 0.0, 0.5, n)
    if case == "dp-noise":
        return fs.DifferentialPrivacyServerSideFixedClipping(fs.FedAvg(**common), 1.0, 0.5, n)
    raise ValueError(f"unknown case {case}")


CASES = [
    "fedavg", "fedavg-fracweight", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "dp-fixed", "dp-noise",
]

server_app = ServerApp()


def _cfg(context: Context, key: str, default):
    # run_simulation() passes an empty run config: the test sets FTK_CHECK_<KEY> instead.
    v = context.run_config.get(key)
    if v in (None, ""):
        v = os.environ.get("FTK_CHECK_" + key.upper().replace("-", "_"), default)
    return v


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(_cfg(context, "out", "")))
    n = int(_cfg(context, "num-nodes", 7))
    rounds = int(_cfg(context, "num-rounds", 3))
    seed = int(_cfg(context, "seed", 0))
    names = str(_cfg(context, "strategies", "all"))
    cases = CASES if names == "all" else names.split(",")
    frac_eval = float(_cfg(context, "fraction-evaluate", 1.0))
    try:
        _run_cases(grid, out, n, rounds, seed, cases, frac_eval)
    except BaseException:
        import traceback

        # Lets a waiting test stop at once instead of timing out.
        (out / "failed").write_text(traceback.format_exc())
        raise
    (out / "done").write_text("ok\n")


def _run_cases(grid: Grid, out: Path, n: int, rounds: int, seed: int, cases: list[str], frac_eval: float) -> None:
    from ftk.flwr import FtkStrategy

    for case in cases:
        for variant in ("native", "ftk"):
            d = out / case / variant
            d.mkdir(parents=True, exist_ok=True)
            random.seed(seed)
            np.random.seed(seed)
            strategy = make_strategy(case, n, frac_eval)
            if variant == "ftk":
                strategy = FtkStrategy(strategy, work_dir=d / "work", seed=seed)

            def save(rnd: int, arrays: ArrayRecord, d=d, strategy=strategy):
                np.savez(d / f"round-{rnd}.npz", **{k: v.numpy() for k, v in arrays.items()})
                info = {}
                if isinstance(strategy, FtkStrategy) and strategy.last_summary and rnd > 0:
                    info = strategy.last_summary
                (d / f"round-{rnd}.json").write_text(json.dumps(info))
                return None

            res = strategy.start(
                grid=grid,
                initial_arrays=initial_arrays(seed),
                num_rounds=rounds,
                evaluate_fn=save,
                train_config=ConfigRecord({"lr": 0.05}),
            )
            ev = {int(k): dict(v) for k, v in res.evaluate_metrics_clientapp.items()}
            tr = {int(k): dict(v) for k, v in res.train_metrics_clientapp.items()}
            (d / "metrics.json").write_text(json.dumps({"evaluate": ev, "train": tr}))
