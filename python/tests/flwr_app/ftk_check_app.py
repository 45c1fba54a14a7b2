"""A small Flower app for checking ftk.flwr against Flower itself.

ClientApp: multi-output linear regression trained by a few steps of full-batch
gradient descent on synthetic data of its own partition (NumPy only, so no
torch). Everything a client returns is a function of (partition, arrays, config),
so the same grid can run one strategy natively, then ftk-backed, and the two
runs see the same client behaviour.

ServerApp: for each named case, runs `num-rounds` rounds with the native
strategy and then with FtkStrategy around a fresh, identical instance, saving
the global model before and after every round to OUT/<case>/<native|ftk>/round-R.npz.

With `mux` set, every (case, native|ftk) runs Flower's own `Strategy.start`
loop at once, one thread each, over a MuxGrid: the messages that all loops
send in the same step go out as ONE message per node and message type (each
loop's records under "m<i>.<name>"), and the ClientApp answers each part as it
would a message of its own. A deployment then pays the per-message costs
(SuperNode polling, one ClientApp process per message) once per step instead of
once per case, while each strategy still sees its own messages and replies.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections import defaultdict
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


def _train(arrays: ArrayRecord, cfg: ConfigRecord, pid: int):
    x, y = partition_data(pid)
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
    return {"arrays": out, "metrics": metrics}


def _evaluate(a: ArrayRecord, cfg: ConfigRecord, pid: int):
    x, y = partition_data(pid)
    loss = float(np.mean((x @ a["fc.weight"].numpy() + a["fc.bias"].numpy() - y) ** 2))
    return {"metrics": MetricRecord({"num-examples": len(x), "frac-weight": 0.5 * len(x) + 0.25, "eval-loss": loss})}


_PART = re.compile(r"m(\d+)\.(.+)")


def _answer(msg: Message, context: Context, fn) -> Message:
    """Reply to a plain message, or to each part of a MuxGrid message."""
    pid = int(context.node_config["partition-id"])
    c = msg.content
    if "arrays" in c:
        return Message(content=RecordDict(fn(c["arrays"], c["config"], pid)), reply_to=msg)
    parts: dict[str, dict] = defaultdict(dict)
    for key, rec in c.items():
        i, name = _PART.fullmatch(key).groups()
        parts[i][name] = rec
    out = RecordDict()
    for i, p in parts.items():
        for name, rec in fn(p["arrays"], p["config"], pid).items():
            out[f"m{i}.{name}"] = rec
    return Message(content=out, reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _train)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _evaluate)


def _own(rec):
    """A record of the loop's own. Inflating a message makes parts with equal
    content ONE Python object (objects are keyed by content hash), and strategies
    change replies in place (DP clipping): without a copy, loops would share them."""
    if isinstance(rec, ArrayRecord):
        return ArrayRecord({k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data) for k, a in rec.items()})
    return type(rec)(dict(rec))


class MuxGrid(Grid):
    """One grid shared by several Flower round loops, one thread each (see the
    module doc). A step is sent once every running loop waits in
    send_and_receive (or has finished), so the loops go in lockstep; replies are
    pulled every `poll` seconds (Flower's HTTP grid sleeps 3 s between pulls)."""

    def __init__(self, grid: Grid, poll: float = 0.2) -> None:
        self.grid = grid
        self.poll = poll
        self._cv = threading.Condition()
        self._running = 0
        self._waiting: dict[int, list[Message]] = {}
        self._done: dict[int, list[Message] | BaseException] = {}
        self._ticket = 0
        self.steps = 0
        # per step: [seconds from the previous step's end (the loops' own work),
        # seconds on the wire (push until the last reply)]
        self.timing: list[list[float]] = []
        self._last = time.time()

    def run_loops(self, jobs) -> None:
        """Run each callable in its own thread; re-raise the first failure."""
        errors: list[BaseException] = []

        def body(job):
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - reported after join
                errors.append(e)
            finally:
                with self._cv:
                    self._running -= 1
                    self._maybe_flush()

        threads = [threading.Thread(target=body, args=(j,), daemon=True) for j in jobs]
        self._running = len(threads)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    # Grid's other methods are the wrapped grid's.
    def set_run(self, run):
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *a, **k):
        return self.grid.create_message(*a, **k)

    def get_node_ids(self):
        with self._cv:
            return self.grid.get_node_ids()

    def push_messages(self, messages):
        raise NotImplementedError("MuxGrid sends through send_and_receive only")

    def pull_messages(self, message_ids):
        raise NotImplementedError("MuxGrid sends through send_and_receive only")

    def send_and_receive(self, messages, *, timeout=None):
        with self._cv:
            t = self._ticket = self._ticket + 1
            self._waiting[t] = list(messages)
            self._timeout = timeout
            self._maybe_flush()
            while t not in self._done:
                self._cv.wait()
            r = self._done.pop(t)
        if isinstance(r, BaseException):
            raise r
        return r

    def _maybe_flush(self) -> None:
        if not self._waiting or len(self._waiting) < self._running:
            return
        batch, self._waiting = self._waiting, {}
        try:
            res = self._exchange(batch)
        except BaseException as e:  # noqa: BLE001 - every waiting loop gets it
            res = {t: e for t in batch}
        self._done.update(res)
        self._cv.notify_all()

    def _exchange(self, batch: dict[int, list[Message]]) -> dict[int, list[Message]]:
        groups: dict[tuple, list[tuple[int, Message]]] = defaultdict(list)
        for t, msgs in batch.items():
            for m in msgs:
                groups[(m.metadata.dst_node_id, m.metadata.message_type)].append((t, m))
        out: dict[int, list[Message]] = {t: [] for t in batch}
        if not groups:
            return out
        self.steps += 1
        t0 = time.time()
        sent = []
        for (node, mtype), parts in groups.items():
            content = RecordDict()
            for i, (_, m) in enumerate(parts):
                for name, rec in m.content.items():
                    content[f"m{i}.{name}"] = rec
            sent.append((Message(content=content, dst_node_id=node, message_type=mtype, group_id=parts[0][1].metadata.group_id), parts))
        ids = list(self.grid.push_messages([m for m, _ in sent]))
        by_id = {i: parts for i, (_, parts) in zip(ids, sent)}
        left = set(i for i in ids if i)
        deadline = time.time() + (self._timeout or 3600)
        while left and time.time() < deadline:
            for reply in self.grid.pull_messages(left):
                mid = reply.metadata.reply_to_message_id
                left.discard(mid)
                for i, (t, m) in enumerate(by_id[mid]):
                    if reply.has_error():
                        out[t].append(Message(reply.error, reply_to=m))
                    else:
                        c = reply.content
                        sub = RecordDict({k.split(".", 1)[1]: _own(c[k]) for k in c.keys() if k.startswith(f"m{i}.")})
                        out[t].append(Message(content=sub, reply_to=m))
            if left:
                time.sleep(self.poll)
        self._last, start = time.time(), self._last
        self.timing.append([round(t0 - start, 2), round(self._last - t0, 2)])
        return out


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
    mux = str(_cfg(context, "mux", "false")).lower() in ("1", "true")
    try:
        _run_cases(grid, out, n, rounds, seed, cases, frac_eval, mux)
    except BaseException:
        import traceback

        # Lets a waiting test stop at once instead of timing out.
        (out / "failed").write_text(traceback.format_exc())
        raise
    (out / "done").write_text("ok\n")


def _run_cases(grid: Grid, out: Path, n: int, rounds: int, seed: int, cases: list[str], frac_eval: float, mux: bool) -> None:
    jobs = [(case, variant) for case in cases for variant in ("native", "ftk")]
    if not mux:
        for case, variant in jobs:
            random.seed(seed)
            np.random.seed(seed)
            _run_one(grid, out, n, rounds, seed, case, variant, frac_eval)
        return
    random.seed(seed)
    np.random.seed(seed)
    g = MuxGrid(grid)
    t0 = time.time()
    g.run_loops([lambda c=c, v=v: _run_one(g, out, n, rounds, seed, c, v, frac_eval) for c, v in jobs])
    (out / "mux.json").write_text(json.dumps({"loops": len(jobs), "steps": g.steps, "s": round(time.time() - t0, 1), "server_s,wire_s": g.timing}))


def _run_one(grid: Grid, out: Path, n: int, rounds: int, seed: int, case: str, variant: str, frac_eval: float) -> None:
    from ftk.flwr import FtkStrategy

    d = out / case / variant
    d.mkdir(parents=True, exist_ok=True)
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
