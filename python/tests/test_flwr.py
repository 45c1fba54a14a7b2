"""ftk.flwr against Flower's own Message-API strategies.

The check app (tests/flwr_app) runs every case twice on the same grid, natively
and through FtkStrategy, and saves the global model before and after each
round; here the two runs must agree within 1e-5 of each tensor's scale, under
Flower's simulation engine and as a real local deployment (SuperLink and
SuperNodes as separate processes on 127.0.0.1). Smaller tests drive the
strategy methods directly with hand-made messages.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import strategy as fs  # noqa: E402

from ftk import _stio  # noqa: E402
from ftk.flwr import FedRA, FtkStrategy, Unsupported, plan  # noqa: E402

APP = Path(__file__).resolve().parent / "flwr_app"
PY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(APP))
import ftk_check_app as app  # noqa: E402

ROUNDS = 3
NODES = 7


# -- comparing the two runs ---------------------------------------------------


def _compare(out: Path, cases, rounds=ROUNDS):
    worst = {}
    for case in cases:
        nat, ftk = out / case / "native", out / case / "ftk"
        if case == "dp-noise":
            continue
        for r in range(rounds + 1):
            a, b = np.load(nat / f"round-{r}.npz"), np.load(ftk / f"round-{r}.npz")
            assert sorted(a.files) == sorted(b.files), case
            for k in a.files:
                assert a[k].shape == b[k].shape, (case, k)
                if a[k].dtype != b[k].dtype:
                    # Flower's Message-API FedAdam multiplies by a numpy float64 step size
                    # (eta_norm), which promotes the float32 model to float64; fed-aggregate
                    # keeps the input dtype (documented deviation).
                    assert (case, str(a[k].dtype), str(b[k].dtype)) == ("fedadam", "float64", "float32"), (case, k)
                scale = float(np.abs(a[k]).max()) or 1.0
                err = float(np.abs(a[k].astype(np.float64) - b[k]).max()) / scale
                worst[case] = max(worst.get(case, 0.0), err)
                assert err <= 1e-5, f"{case} round {r} {k}: {err:.2e} of scale"
        ma, mb = json.loads((nat / "metrics.json").read_text()), json.loads((ftk / "metrics.json").read_text())
        for kind in ("train", "evaluate"):
            assert ma[kind].keys() == mb[kind].keys(), (case, kind)
            for rnd in ma[kind]:
                for key, v in ma[kind][rnd].items():
                    assert mb[kind][rnd][key] == pytest.approx(v, rel=1e-4), (case, kind, rnd, key)
    if "dp-noise" in cases:
        _check_dp_noise(out)
    print("worst error / scale:", json.dumps(worst))
    return worst


def _check_dp_noise(out: Path):
    """Same clipping, noise of the same std: round 1 starts from the same model
    and the same replies with and without noise, so the difference is the noise."""
    z, c = 1.0, 0.5
    std = z * c / NODES
    summ = json.loads((out / "dp-noise" / "ftk" / "round-1.json").read_text())
    assert summ["dp"]["noise_std"] == pytest.approx(std, rel=1e-12)
    fixed = json.loads((out / "dp-fixed" / "ftk" / "round-1.json").read_text())
    assert fixed["clipped"] == summ["clipped"] and summ["clipped"] > 0
    for variant in ("native", "ftk"):
        a = np.load(out / "dp-noise" / variant / "round-1.npz")
        b = np.load(out / "dp-fixed" / variant / "round-1.npz")
        d = np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in a.files])
        assert d.std() == pytest.approx(std, rel=0.15), variant
        assert abs(d.mean()) < 4 * std / np.sqrt(d.size), variant


# -- Flower's simulation engine ----------------------------------------------


def test_simulation_every_strategy_native_vs_ftk(tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    monkeypatch.setenv("FTK_CHECK_OUT", str(tmp_path))
    monkeypatch.setenv("FTK_CHECK_NUM_NODES", str(NODES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PY), str(APP), os.environ.get("PYTHONPATH", "")]))
    run_simulation(
        server_app=app.server_app,
        client_app=app.client_app,
        num_supernodes=NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )
    if (tmp_path / "failed").exists():
        pytest.fail((tmp_path / "failed").read_text())
    assert (tmp_path / "done").exists(), "the ServerApp did not finish"
    _compare(tmp_path, app.CASES)


# -- a real local deployment -------------------------------------------------


def _free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _bin(name):
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else shutil.which(name)


# A deployment message costs seconds: the SuperNode polls the SuperLink every 3 s
# when idle and starts one ClientApp process per message. So the ServerApp runs
# every case's Flower loop at once over a MuxGrid (tests/flwr_app): one message per
# node per step carries all 28 loops' records, and the whole check costs 6 steps
# (3 rounds of train + evaluate) instead of 168. FTK_DEPLOY_CASES=a,b narrows it.
# (Flower's FLWR_SUPEREXEC_TASK_POLL_INTERVAL stays at its 1 s: at 0.2 s, eight idle
# SuperExecs polling their SuperNode/SuperLink took about 0.45 of the 2 cores, more than
# the up to 0.8 s per step it saves.)
DEPLOY_CASES = os.environ.get("FTK_DEPLOY_CASES", "all")


def test_deployment_superlink_supernodes_native_vs_ftk(tmp_path):
    cases = app.CASES if DEPLOY_CASES == "all" else DEPLOY_CASES.split(",")
    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    # Flower 1.42 serves the Runtime, Control and Fleet APIs over HTTP on one port.
    link, *node_ports = _free_ports(1 + NODES)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "ftk-local"\n\n[superlink.ftk-local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    # The SuperLink and SuperNodes start flower-superexec / flwr-serverapp / flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(PY), env.get("PYTHONPATH", "")])
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def spawn(name, args):
        f = open(logs / f"{name}.log", "w")
        procs.append((subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), f))

    try:
        spawn("superlink", [
            _bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(link),
        ])
        _wait_port(link, procs, logs)
        for i, port in enumerate(node_ports):
            spawn(f"supernode{i}", [
                _bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--port", str(port), "--node-config", f"partition-id={i} num-partitions={NODES}",
            ])
        cfg = f'out="{out}" num-nodes={NODES} num-rounds={ROUNDS} strategies="{",".join(cases)}" mux=true'
        # `flwr run --stream` follows the run's logs until it ends; the ServerApp
        # writes OUT/done (or OUT/failed) when it has finished.
        spawn("flwr-run", [_bin("flwr"), "run", str(APP), "ftk-local", "--run-config", cfg, "--stream"])
        deadline = time.time() + float(os.environ.get("FTK_DEPLOY_TIMEOUT", "1800"))
        runner = procs[-1][0]
        while not (out / "done").exists() and not (out / "failed").exists() and time.time() < deadline:
            if runner.poll() not in (None, 0):
                pytest.fail(f"flwr run exited {runner.returncode}\n{_tail(logs)}")
            time.sleep(1)
        if (out / "failed").exists():
            pytest.fail(f"the ServerApp failed:\n{(out / 'failed').read_text()}")
        if not (out / "done").exists():
            pytest.fail(f"deployment run did not finish\n{_tail(logs)}")
    finally:
        _stop(procs, [link, *node_ports])
    mux = json.loads((out / "mux.json").read_text())
    print("deployment:", json.dumps(mux))
    # every loop's train and evaluate messages of a round went out together
    assert mux == {**mux, "loops": 2 * len(cases), "steps": 2 * ROUNDS}
    _compare(out, cases)


def _stop(procs, ports):
    """Stop what the test started: its processes, then the helpers they detached
    (flower-superexec, flwr-serverapp/-clientapp), found by this test's ports."""
    for p, _ in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
    deadline = time.time() + 10
    for p, f in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            p.wait()
        f.close()
    marks = [f"127.0.0.1:{port}" for port in ports]
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        if any(m in args.split() or f" {m} " in f" {args} " for m in marks) and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, PermissionError):
                pass


def _wait_port(port, procs, logs, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if any(p.poll() is not None for p, _ in procs):
            break
        time.sleep(0.2)
    pytest.fail(f"port {port} never opened\n{_tail(logs)}")


def _tail(logs: Path) -> str:
    return "\n".join(f"== {p.name}\n" + p.read_text()[-2000:] for p in sorted(logs.glob("*.log")))


# -- direct calls with hand-made messages ------------------------------------


def _rec(d):
    return ArrayRecord({k: Array(v) for k, v in d.items()})


class FakeGrid:
    """The part of Grid the strategies use; replies come from _client in-process.
    crash_at=(round, exc) raises exc when that round's train messages are sent."""

    def __init__(self, n, crash_at=None):
        self.crash_at = crash_at
        # Messages are stamped with the run of the process (set by Flower's runtimes).
        from flwr.supercore.task_identity import TaskIdentity

        if TaskIdentity._run_id is None:
            TaskIdentity.run_id = 1
            TaskIdentity.node_id = 0
            TaskIdentity.task_id = 1
        self.nodes = list(range(101, 101 + n))

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            if self.crash_at and int(m.content["config"]["server-round"]) == self.crash_at[0]:
                raise self.crash_at[1]
            rec, metrics = _client(m)
            replies.append(Message(content=RecordDict({"arrays": rec, "metrics": MetricRecord(metrics)}), reply_to=m))
        return replies


def _round(strategy, grid, arrays, rnd, client):
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    replies = []
    for m in msgs:
        rec, metrics = client(m)
        replies.append(Message(content=RecordDict({"arrays": rec, "metrics": MetricRecord(metrics)}), reply_to=m))
    return strategy.aggregate_train(rnd, replies)


def _client(m):
    node = m.metadata.dst_node_id
    a = m.content["arrays"]
    rng = np.random.default_rng(node * 10 + int(m.content["config"]["server-round"]))
    rec = {k: Array(v.numpy() + rng.normal(size=v.numpy().shape).astype(v.numpy().dtype)) if v.numpy().dtype.kind == "f"
           else Array(v.numpy() + np.int64(node % 5)) for k, v in a.items()}
    return ArrayRecord(rec), {"num-examples": 10 + node % 7}


def test_plan_passes_every_parameter_explicitly():
    assert plan(fs.FedAdam(eta=0.3, eta_l=0.2, beta_1=0.5, beta_2=0.7, tau=1e-4)) == (
        "fedadam", ["--eta", "0.3", "--eta-l", "0.2", "--beta1", "0.5", "--beta2", "0.7", "--tau", "0.0001"], True)
    assert plan(fs.FedAdagrad())[1] == ["--eta", "0.1", "--eta-l", "0.1", "--tau", "0.001"]
    assert plan(fs.FedYogi())[1][-2:] == ["--tau", "0.001"]
    assert plan(fs.FedAvgM(server_learning_rate=0.5, server_momentum=0.0)) == (
        "fedavgm", ["--server-lr", "0.5", "--server-momentum", "0.0"], False)
    assert plan(fs.MultiKrum(num_malicious_nodes=2, num_nodes_to_select=4))[1] == ["--num-malicious", "2", "--to-keep", "4"]
    assert plan(fs.FedTrimmedAvg(beta=0.1))[1] == ["--trim-beta", "0.1"]


def test_refuses_what_it_cannot_reproduce():
    with pytest.raises(Unsupported, match="selection_rule"):
        plan(fs.Bulyan(selection_rule=lambda c, f, n: c[:n]))

    class MyAvg(fs.FedAvg):
        pass

    with pytest.raises(Unsupported, match="MyAvg"):
        plan(MyAvg())
    with pytest.raises(Unsupported):
        plan(fs.QFedAvg(client_learning_rate=0.1))
    with pytest.raises(Unsupported, match="server-side fixed"):
        FtkStrategy(fs.DifferentialPrivacyClientSideFixedClipping(fs.FedAvg(), 1.0, 1.0, 3), work_dir="/tmp/unused-ftk")


def test_integer_arrays_follow_fed_aggregate_not_flower(tmp_path):
    grid = FakeGrid(4)
    arrays = _rec({"w": np.zeros(5, np.float32), "steps": np.array([100, 7], np.int64)})
    s = FtkStrategy(fs.FedAvg(min_available_nodes=4, min_train_nodes=4), work_dir=tmp_path / "w")
    out, _ = _round(s, grid, arrays, 1, _client)
    native, _ = _round(fs.FedAvg(min_available_nodes=4, min_train_nodes=4), grid, arrays, 1, _client)
    steps = out["steps"].numpy()
    assert steps.dtype == np.int64
    # weighted mean of 100 + node%5 (nodes 101..104 -> +1..+4), rounded to the nearest integer
    w = np.array([10 + n % 7 for n in grid.nodes], float)
    want = np.rint((np.array([n % 5 for n in grid.nodes]) * w).sum() / w.sum() + np.array([100, 7]))
    np.testing.assert_array_equal(steps, want)
    # Flower's Message-API FedAvg returns the float64 mean instead (documented deviation).
    assert native["steps"].numpy().dtype == np.float64


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path):
    init = _rec({"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)})

    def make():
        return fs.FedAdam(eta=0.05, min_available_nodes=5, min_train_nodes=5, fraction_evaluate=0.0)

    class Crash(Exception):
        pass

    def run(work, crash_at=None):
        # Strategy.start (Flower's own round loop) over a grid that answers in-process.
        s = FtkStrategy(make(), work_dir=work)
        res = s.start(grid=FakeGrid(5, crash_at=crash_at), initial_arrays=init, num_rounds=3)
        return res.arrays["w"].numpy()

    straight = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_at=(3, Crash))
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["round"] == 2
    resumed = run(tmp_path / "b")
    np.testing.assert_array_equal(straight, resumed)
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["round"] == 3
    # and the uninterrupted run equals Flower's own FedAdam
    native = make().start(grid=FakeGrid(5), initial_arrays=init, num_rounds=3).arrays["w"].numpy()
    assert native.dtype == np.float64  # Flower's FedAdam promotes; ftk keeps float32
    np.testing.assert_allclose(straight, native, rtol=0, atol=1e-5 * np.abs(straight).max())


def test_keep_local_and_fedra_options(tmp_path):
    grid = FakeGrid(4)
    init = _rec({f"layers.{i}.w": np.full(3, float(i), np.float32) for i in range(4)} | {"head.attn": np.ones(2, np.float32)})
    s = FtkStrategy(fs.FedAvg(min_available_nodes=4, min_train_nodes=4), work_dir=tmp_path / "k", keep_local=r"attn")
    out, _ = _round(s, grid, init, 1, _client)
    np.testing.assert_array_equal(out["head.attn"].numpy(), init["head.attn"].numpy())
    assert not np.array_equal(out["layers.0.w"].numpy(), init["layers.0.w"].numpy())

    fedra = FedRA(layers=4, capacity=[4, 3, 2, 1], seed=3)
    s = FtkStrategy(fs.FedAvg(min_available_nodes=4, min_train_nodes=4), work_dir=tmp_path / "f", fedra=fedra)
    sent, returned = {}, {}

    def client(m):
        alloc = json.loads(m.content["config"][fedra.config_key])
        node = m.metadata.dst_node_id
        held = sent[node] = alloc[str(node)]
        rec, metrics = _client(m)
        # a FedRA client trains (and returns) only the layers it holds
        rec = ArrayRecord({k: v for k, v in rec.items() if not k.startswith("layers.") or int(k.split(".")[1]) in held})
        returned[node] = {k: v.numpy() for k, v in rec.items()}
        return rec, metrics

    out, _ = _round(s, grid, init, 1, client)
    assert sorted(len(v) for v in sent.values()) == [1, 2, 3, 4]
    for L in range(4):
        holders = [n for n, held in sent.items() if L in held]
        want = np.mean([returned[n][f"layers.{L}.w"] for n in holders], axis=0) if holders else init[f"layers.{L}.w"].numpy()
        np.testing.assert_allclose(out[f"layers.{L}.w"].numpy(), want, rtol=1e-6)


class PushPullGrid(FakeGrid):
    """push/pull half of the Grid API; replies come from the check app's ClientApp
    functions (node i plays partition i), so muxed messages are answered part by part.
    Both ways a message is deflated and inflated as Flower's transport does (equal
    records come out as one object)."""

    def __init__(self, n):
        super().__init__(n)
        self.pushed = 0
        self._replies = {}

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.pushed += 1
            mid = f"msg-{self.pushed}"
            ctx = type("Ctx", (), {"node_config": {"partition-id": self.nodes.index(m.metadata.dst_node_id)}})()
            fn = app.train if m.metadata.message_type == MessageType.TRAIN else app.evaluate
            reply = _transport(fn(_transport(m), ctx))
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _transport(m):
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    meta = m.metadata
    contents = {k: o.deflate() for k, o in get_all_nested_objects(m).items()}
    out = inflate_object_from_contents(m.object_id, contents)
    for k in ("_dst_node_id", "_src_node_id", "_message_type", "_reply_to_message_id", "_group_id"):
        out.metadata.__dict__[k] = meta.__dict__[k]
    return out


def test_muxgrid_gives_each_loop_the_replies_it_gets_alone(tmp_path):
    # DP clipping changes the replies in place: loops must not share them
    cases = ["fedavg", "fedadam", "bulyan", "fedavgm", "dp-fixed", "krum"]
    init = app.initial_arrays(0)

    def loop(grid, case, seen):
        s = app.make_strategy(case, 7)
        agg = s.aggregate_train

        def record(rnd, replies):
            replies = list(replies)
            seen.setdefault(case, []).append(
                {m.metadata.src_node_id: ({k: bytes(v.data) for k, v in m.content["arrays"].items()}, dict(m.content["metrics"])) for m in replies}
            )
            assert sorted(m.metadata.src_node_id for m in replies) == sorted(grid.get_node_ids())
            return agg(rnd, replies)

        s.aggregate_train = record
        res = s.start(grid=grid, initial_arrays=init, num_rounds=2, train_config=ConfigRecord({"lr": 0.05}))
        seen[case, "result"] = res

    alone = {}
    for c in cases:
        loop(PushPullGrid(7), c, alone)
    inner = PushPullGrid(7)
    mux = app.MuxGrid(inner, poll=0.0)
    muxed = {}
    mux.run_loops([lambda c=c: loop(mux, c, muxed) for c in cases])
    # 2 rounds x (train + evaluate), one message per node each
    assert (mux.steps, inner.pushed) == (4, 4 * 7)
    for c in cases:
        # Round 1: the same replies, byte for byte, from the same nodes. (Later rounds
        # start from models that may differ in the last bit: each loop samples the
        # nodes in a random order, so float32 sums round differently.)
        assert len(muxed[c]) == len(alone[c]) == 2 and muxed[c][0] == alone[c][0], c
        a, b = muxed[c, "result"], alone[c, "result"]
        for k in init.keys():
            # (sampling order differs, so float32 sums may round differently)
            np.testing.assert_allclose(a.arrays[k].numpy(), b.arrays[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=c)
        assert a.evaluate_metrics_clientapp.keys() == b.evaluate_metrics_clientapp.keys()


def test_scratch_dir_holds_client_files_only_during_the_round(tmp_path):
    grid = FakeGrid(4)
    init = _rec({"w": np.linspace(-1, 1, 8, dtype=np.float32)})
    outs = {}
    for name, scratch in (("work", None), ("scratch", tmp_path / "shm")):
        s = FtkStrategy(fs.FedAdam(min_available_nodes=4, min_train_nodes=4), work_dir=tmp_path / name, scratch_dir=scratch)
        out, _ = _round(s, grid, init, 1, _client)
        outs[name] = out["w"].numpy()
    np.testing.assert_array_equal(outs["work"], outs["scratch"])
    assert list((tmp_path / "shm").iterdir()) == []
    # the persistent state stays in work_dir
    assert (tmp_path / "scratch" / "state.safetensors").exists() and not list((tmp_path / "scratch").glob("round-*"))
