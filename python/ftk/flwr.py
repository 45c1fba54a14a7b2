"""Flower Message-API strategies whose train aggregation is fed-aggregate.

    from flwr.serverapp.strategy import FedAdam
    from ftk.flwr import FtkStrategy

    strategy = FtkStrategy(FedAdam(eta=0.1, min_available_nodes=5), work_dir="ftk-work")
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)

Sampling, configuration, evaluation and metric aggregation stay the wrapped
Flower strategy's own code. Only the train ArrayRecords take another path: each
reply's arrays are written once, straight from the message's bytes, as a
safetensors client file; `fed-aggregate --flower-api message` computes the new
global model with every parameter taken from the Flower instance; the result
comes back as the round's ArrayRecord. The global model and the server
optimiser state live in `work_dir` (written atomically), so a ServerApp that
crashed resumes where the last finished round left off (see `FtkStrategy.start`).

Supported (exact types; subclasses are refused since they may change the math):
FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan (default selection rule), each optionally
inside DifferentialPrivacyServerSideFixedClipping (without an accountant).

Deviations from Flower, all deliberate:
- integer arrays: fed-aggregate's rounded weighted mean in the array's dtype
  (Flower's Message-API FedAvg returns a float64 mean; FedAdam and friends
  apply the optimiser to them); no optimiser step or DP noise on integers;
- accumulation in float64 with one rounding (Flower: float32 arithmetic), so
  results agree to float32 rounding, not bit for bit;
- DP noise comes from fed-aggregate's seeded generator (`seed`), with
  Flower's std z*C/num_sampled_clients; it is not numpy's global RNG;
- the output keeps each array's dtype: Flower's Message-API FedAdam turns a
  float32 model into float64 (its step size is a numpy float64 scalar).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version as _pkg_version
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
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
    MultiKrum,
    Result,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.serverapp.strategy.multikrum import select_multikrum

from . import _stio
from .bin import find_binary

log = logging.getLogger("ftk")

#: Flower versions this wrapper was tested against (flwr.serverapp.strategy).
SUPPORTED_FLWR = "1.42"

_flwr_version = _pkg_version("flwr")
if not _flwr_version.startswith(SUPPORTED_FLWR + "."):
    log.warning(
        "ftk.flwr was tested with flwr %s.x, found %s: strategy attributes may differ",
        SUPPORTED_FLWR,
        _flwr_version,
    )


class Unsupported(ValueError):
    """The wrapped strategy cannot be reproduced by fed-aggregate."""


class AggregateError(RuntimeError):
    """fed-aggregate refused the round (its one-line error is the message)."""


@dataclass
class FedRA:
    """FedRA layer allocation (leondada/FedRA), drawn each round by
    `fed-aggregate fedra-alloc` and sent to clients in the train config under
    `config_key` as JSON {"<node id>": [layer, ...]}. Layers are found in
    tensor names with `layer_pattern` (first group = layer index)."""

    layers: int
    capacity: Sequence[int]
    layer_pattern: str = r"layers\.(\d+)\."
    seed: int = 0
    config_key: str = "ftk-fedra-alloc"


def _f(x: float) -> str:
    return repr(float(x))


def plan(base: Strategy) -> tuple[str, list[str], bool]:
    """fed-aggregate strategy name, its flags from the instance, and whether
    it keeps server state. Raises Unsupported for anything else."""
    t = type(base)
    if t is FedAvg:
        return "fedavg", [], False
    if t is FedProx:
        return "fedprox", [], False
    if t is FedAvgM:
        flags = ["--server-lr", _f(base.server_learning_rate)]
        flags += ["--server-momentum", _f(base.server_momentum)]
        return "fedavgm", flags, base.server_momentum > 0.0
    if t in (FedAdam, FedYogi):
        flags = ["--eta", _f(base.eta), "--eta-l", _f(base.eta_l)]
        flags += ["--beta1", _f(base.beta_1), "--beta2", _f(base.beta_2), "--tau", _f(base.tau)]
        return ("fedadam" if t is FedAdam else "fedyogi"), flags, True
    if t is FedAdagrad:
        return "fedadagrad", ["--eta", _f(base.eta), "--eta-l", _f(base.eta_l), "--tau", _f(base.tau)], True
    if t is FedMedian:
        return "fedmedian", [], False
    if t is FedTrimmedAvg:
        return "fedtrimmedavg", ["--trim-beta", _f(base.beta)], False
    if t is Krum:
        return "krum", ["--num-malicious", str(int(base.num_malicious_nodes))], False
    if t is MultiKrum:
        return (
            "multikrum",
            ["--num-malicious", str(int(base.num_malicious_nodes)), "--to-keep", str(int(base.num_nodes_to_select))],
            False,
        )
    if t is Bulyan:
        if base.selection_rule is not select_multikrum:
            raise Unsupported(
                "Bulyan with a custom selection_rule: fed-aggregate implements Flower's default "
                "(select_multikrum); drop selection_rule or use the native strategy"
            )
        return "bulyan", ["--num-malicious", str(int(base.num_malicious_nodes))], False
    raise Unsupported(
        f"{t.__module__}.{t.__name__} is not one fed-aggregate reproduces; supported (exact types): "
        "FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum, "
        "MultiKrum, Bulyan, optionally inside DifferentialPrivacyServerSideFixedClipping"
    )


# -- ArrayRecord <-> safetensors, without decoding through numpy -------------


def _npy_payload(arr: Array) -> tuple[str, tuple[int, ...], memoryview]:
    """(safetensors dtype, shape, raw C-order bytes) of a Flower Array, as a
    view into its .npy bytes when possible (no copy)."""
    data = arr.data
    if arr.stype == "numpy.ndarray" and data[:6] == b"\x93NUMPY":
        major = data[6]
        if major == 1:
            (hl,) = struct.unpack("<H", data[8:10])
            start = 10
        else:
            (hl,) = struct.unpack("<I", data[8:12])
            start = 12
        d = ast.literal_eval(bytes(data[start : start + hl]).decode("latin1"))
        dt = np.dtype(d["descr"])
        shape = tuple(d["shape"])
        if not d["fortran_order"] and dt.byteorder != ">" and dt.hasobject is False:
            raw = memoryview(data)[start + hl :]
            if raw.nbytes == int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                return _stio.st_dtype(dt), shape, raw
    a = np.ascontiguousarray(arr.numpy())
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return _stio.st_dtype(a.dtype), a.shape, memoryview(a).cast("B")


def write_arrayrecord(path: Path, record: ArrayRecord, fsync: bool = False) -> None:
    """One safetensors file with every array of `record`, each written once."""
    tensors = []
    for k, arr in record.items():
        code, shape, raw = _npy_payload(arr)
        tensors.append((k, code, shape, raw))
    _stio.write(path, tensors, fsync=fsync)


def _npy_header(dt: np.dtype, shape: tuple[int, ...]) -> bytes:
    b = BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": shape})
    return b.getvalue()


def read_arrayrecord(path: Path, order: Iterable[str], fill: ArrayRecord | None = None) -> ArrayRecord:
    """The arrays of a safetensors file as an ArrayRecord in `order`; names
    missing from the file come from `fill` (personalised layers)."""
    r = _stio.Reader(path)
    out = {}
    for k in order:
        if k in r.header:
            code, shape = r.info(k)
            dt = _stio.np_dtype(code)
            out[k] = Array(
                dtype=str(dt),
                shape=tuple(shape),
                stype="numpy.ndarray",
                data=b"".join((_npy_header(dt, shape), r.raw(k))),
            )
        elif fill is not None and k in fill:
            out[k] = fill[k]
        else:
            raise AggregateError(f"{path}: no tensor '{k}' in fed-aggregate's output")
    return ArrayRecord(out)


# -- the wrapper -------------------------------------------------------------


class FtkStrategy(Strategy):
    """Wrap a Flower Message-API strategy; fed-aggregate does its train aggregation.

    strategy        a supported flwr.serverapp.strategy instance (see module doc)
    work_dir        global model, optimiser state, this round's client files
    weighted_by_key metric key for client weights; default: the strategy's own
                    (Flower's "num-examples"); fractional values are accepted
    keep_local      regex: matching arrays are personalised (not aggregated; the
                    returned record keeps the current global's values for them)
    fedra           FedRA(...): per-round layer allocation sent to the clients,
                    layer-wise aggregation over holders (no native Flower peer)
    seed            DP noise seed (each round uses seed and the round number)
    device          fed-aggregate --device (cpu, cuda, auto)
    keep_files      keep every round's client files (default: only the last
                    round's are removed after a successful aggregation)
    scratch_dir     where each round's client files go (default: work_dir). They
                    live only for one fed-aggregate run and a resumed round is
                    re-sent, so a tmpfs such as /dev/shm saves the disk writeback
                    (measured: 4x faster hand-off for 50 x 50 MiB, see bench/README.md);
                    they are removed after the round, failed or not
    """

    def __init__(
        self,
        strategy: Strategy,
        work_dir: str | Path = "ftk-work",
        *,
        weighted_by_key: str | None = None,
        keep_local: str | None = None,
        fedra: FedRA | None = None,
        seed: int = 0,
        device: str = "cpu",
        keep_files: bool = False,
        fed_aggregate: str | None = None,
        scratch_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.dp = None
        base = strategy
        if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
            if getattr(strategy, "accountant", None) is not None:
                raise Unsupported("DP with an accountant: fed-aggregate reports a per-round epsilon instead; pass accountant=None")
            self.dp = strategy
            base = strategy.strategy
        elif type(strategy).__name__.startswith("DifferentialPrivacy"):
            raise Unsupported(f"{type(strategy).__name__}: only server-side fixed clipping is reproduced")
        self.base = base
        self.name, self.flags, self.stateful = plan(base)
        if fedra is not None and self.name not in ("fedavg", "fedprox"):
            raise Unsupported("fedra applies to a FedAvg/FedProx strategy (unweighted mean over the holders of each layer)")
        if fedra is not None and self.dp is not None:
            raise Unsupported("fedra with DP clipping is not supported by fed-aggregate")
        self.weighted_by_key = weighted_by_key or base.weighted_by_key
        self.keep_local = keep_local
        if keep_local is not None:
            re.compile(keep_local)
        self.fedra = fedra
        self.seed = int(seed)
        self.device = device
        self.keep_files = keep_files
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(scratch_dir) if scratch_dir is not None else None
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
        self.bin = fed_aggregate or find_binary("fed-aggregate")
        self._offset = 0
        self._global: Path | None = None  # file holding the arrays last sent out
        self._sent: ArrayRecord | None = None
        self._returned: ArrayRecord | None = None
        self._alloc: Path | None = None
        self.last_summary: dict | None = None

    # -- plumbing that stays Flower's ------------------------------------

    def summary(self) -> None:
        log.info("ftk: %s aggregated by %s --strategy %s --flower-api message %s", type(self.base).__name__, self.bin, self.name, " ".join(self.flags))
        self.strategy.summary()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self._offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self._offset, replies)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        r = server_round + self._offset
        if arrays is not self._returned or self._global is None:
            # New arrays from the ServerApp (first round, or it changed them).
            self._global = self.work / f"global-r{r - 1}.safetensors"
            write_arrayrecord(self._global, arrays, fsync=True)
        self._sent = arrays
        msgs = list(self.strategy.configure_train(r, arrays, config, grid))
        if self.fedra is not None and msgs:
            msgs = self._fedra_alloc(r, msgs)
        return msgs

    def _fedra_alloc(self, r: int, msgs: list[Message]) -> list[Message]:
        f = self.fedra
        nodes = sorted(m.metadata.dst_node_id for m in msgs)
        cmd = [self.bin, "fedra-alloc", "--clients", str(len(nodes)), "--layers", str(f.layers)]
        cmd += ["--capacity", ",".join(str(int(c)) for c in f.capacity), "--round", str(r), "--seed", str(f.seed)]
        out = _run(cmd)
        alloc = {}
        lines = []
        for line in out.splitlines():
            rec = json.loads(line)
            node = nodes[int(rec["client"])]
            rec["cid"] = str(node)
            alloc[str(node)] = rec["layers"]
            lines.append(json.dumps(rec))
        self._alloc = self.work / f"alloc-r{r}.jsonl"
        self._alloc.write_text("\n".join(lines) + "\n")
        key = self.base.configrecord_key
        for m in msgs:
            m.content[key][f.config_key] = json.dumps(alloc)
        return msgs

    # -- the one step fed-aggregate takes over ---------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = server_round + self._offset
        replies = list(replies)
        if self.dp is not None and not validate_replies(replies, self.dp.num_sampled_clients):
            return None, None
        # FedRA replies hold only their layers, which Flower's key-consistency check
        # refuses; fed-aggregate checks each layer against the allocation instead.
        valid, _ = self.base._check_and_log_replies(replies, is_train=True, validate=self.fedra is None)
        if not valid:
            return None, None
        if self.name == "bulyan" and len(valid) < 4 * self.base.num_malicious_nodes + 3:
            log.warning("ftk: %d replies < 4*num_malicious_nodes+3: skipping Bulyan aggregation as Flower does", len(valid))
            return None, None
        contents = [m.content for m in valid]
        if self.scratch is None:
            rdir = self.work / f"round-{r}"
            rdir.mkdir(exist_ok=True)
            return self._aggregate(r, valid, contents, rdir)
        # A shared scratch dir may serve several strategies: a fresh dir each round.
        rdir = Path(tempfile.mkdtemp(prefix=f"ftk-round-{r}-", dir=self.scratch))
        try:
            return self._aggregate(r, valid, contents, rdir)
        finally:
            if not self.keep_files:
                shutil.rmtree(rdir, ignore_errors=True)

    def _aggregate(self, r: int, valid: list[Message], contents: list, rdir: Path) -> tuple[ArrayRecord, MetricRecord | None]:
        lines = []
        cids = []
        jobs = []
        for m, c in zip(valid, contents):
            rec = next(iter(c.array_records.values()))
            metrics = next(iter(c.metric_records.values()))
            w = metrics[self.weighted_by_key]
            cid = str(m.metadata.src_node_id)
            jobs.append((rdir / f"{cid}.safetensors", rec))
            lines.append(json.dumps({"kind": "client_update", "cid": cid, "path": f"{cid}.safetensors", "num_examples": float(w)}))
            cids.append(cid)
        # File writes release the GIL: one writer per core.
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as ex:
            list(ex.map(lambda j: write_arrayrecord(*j), jobs))
        manifest = rdir / "clients.jsonl"
        manifest.write_text("\n".join(lines) + "\n")
        first = next(iter(contents[0].array_records.values()))
        order = list((self._sent if self.fedra is not None else first).keys())
        out = self.work / f"global-r{r}.safetensors"
        cmd = [self.bin, "--strategy", "fedra" if self.fedra else self.name, "--flower-api", "message", *self.flags]
        cmd += ["--device", self.device, "-o", str(out)]
        need_global = self.stateful or self.dp is not None or self.fedra is not None
        if need_global:
            cmd += ["--global", str(self._global)]
        if self.stateful:
            state = self.work / "state.safetensors"
            cmd += ["--state", str(state)]
            # fed-aggregate creates a state only when told to (a missing one is an error).
            if not state.exists():
                cmd.append("--init-state")
        if self.keep_local:
            cmd += ["--keep-local", self.keep_local]
        if self.fedra is not None:
            cmd += ["--alloc", str(self._alloc), "--layer-pattern", self.fedra.layer_pattern]
        if self.dp is not None:
            cmd += ["--clip-norm", _f(self.dp.clipping_norm)]
            if self.dp.noise_multiplier > 0:
                # Flower's std is z*C/num_sampled_clients; fed-aggregate's z*C/replies.
                z = self.dp.noise_multiplier * len(valid) / self.dp.num_sampled_clients
                cmd += ["--noise-multiplier", _f(z), "--seed", str(self.seed * 1_000_003 + r)]
        cmd.append(str(manifest))
        summary = json.loads(_run(cmd).splitlines()[-1])
        self.last_summary = summary
        if self.stateful and summary.get("round") != r:
            log.warning("ftk: fed-aggregate's state is at round %s but Flower's is %d (FedAdam's bias correction uses it)", summary.get("round"), r)
        arrays = read_arrayrecord(out, order, fill=self._sent)
        # The round is done once the progress file names it.
        _stio.write_json_atomic(self.work / "progress.json", {"round": r, "global": out.name, "strategy": self.name})
        if not self.keep_files:
            shutil.rmtree(rdir, ignore_errors=True)
        if self._global is not None and self._global != out and self._global.exists():
            self._global.unlink()
        self._global = out
        self._returned = arrays
        if "selected" in summary:
            keep = set(summary["selected"])
            contents = [c for cid, c in zip(cids, contents) if cid in keep]
        metrics = self.base.train_metrics_aggr_fn(contents, self.base.weighted_by_key)
        return arrays, metrics

    # -- resuming --------------------------------------------------------

    def resume_point(self) -> tuple[int, Path | None]:
        """(rounds already aggregated, the global model file after them)."""
        p = self.work / "progress.json"
        if not p.exists():
            return 0, None
        d = json.loads(p.read_text())
        if d.get("strategy") != self.name:
            raise Unsupported(f"{self.work}: holds a {d.get('strategy')} run, not {self.name}; use another work_dir")
        r, g = int(d["round"]), self.work / d["global"]
        st = self.work / "state.safetensors"
        if self.stateful and st.exists():
            sr = int(_stio.Reader(st).metadata.get("round", "0"))
            nxt = self.work / f"global-r{sr}.safetensors"
            if sr == r + 1 and nxt.exists():
                # Crashed after fed-aggregate committed, before progress.json.
                r, g = sr, nxt
            elif sr != r:
                raise AggregateError(f"{st}: state at round {sr} but progress.json at {r}; remove the work dir to start over")
        return r, g

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop, resumed after the last round `work_dir` holds:
        with k rounds done, it starts from their global model and runs rounds
        k+1..num_rounds (server-round numbers as in an uninterrupted run)."""
        done, g = self.resume_point()
        self._offset = done
        if done:
            if done >= num_rounds:
                res = Result()
                res.arrays = read_arrayrecord(g, list(initial_arrays.keys()), fill=initial_arrays)
                return res
            log.info("ftk: resuming after round %d from %s", done, g)
            initial_arrays = read_arrayrecord(g, list(initial_arrays.keys()), fill=initial_arrays)
            self._global, self._returned = g, initial_arrays
        efn = evaluate_fn
        if efn is not None and done:
            efn = lambda rnd, arrays: evaluate_fn(rnd + done, arrays)  # noqa: E731
        return super().start(grid, initial_arrays, num_rounds - done, timeout, train_config, evaluate_config, efn)


def _run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if p.returncode != 0:
        err = p.stderr.strip().splitlines()
        raise AggregateError(err[-1] if err else f"{cmd[0]} exited {p.returncode}")
    return p.stdout


def _env() -> dict:
    e = dict(os.environ)
    e["FTK_NO_PROGRESS"] = "1"
    return e
