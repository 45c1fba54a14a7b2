"""Router traces out of PyTorch MoE models, in the layouts route-hist reads.

Hugging Face transformers (5.x: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2,
DeepSeek-V3 and every model whose MoE router is a module returning
(logits, weights, top-k ids)):

    from ftk.trace import RouterTrace
    tr = RouterTrace(logits=False).attach_hf(model)
    with tr.step(0):
        model(**batch)
    tr.save("trace.safetensors")            # layer.{L}.topk [tokens, k], L = decoder layer

The recorded ids are the router's own output, i.e. the experts the model
actually dispatched to (DeepSeek-V3's sigmoid + bias + group-limited choice
included), not a re-derivation from logits. Padding positions are left out
when a token mask is given (`tr.token_mask = attention_mask`, the CLI does it).

Megatron-Core: `tr.attach_megatron(model)` hooks every TopKRouter (layer from
its `layer_number`, 1-based in Megatron, so L = layer_number - 1); see
`RouterTrace.attach_megatron` for a training-loop example with a live
JSON-lines stream into route-hist.

Command line:
    python -m ftk.trace --model DIR --prompts FILE -o trace.safetensors
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import IO, Iterable

import numpy as np

from . import _stio

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class RouterTrace:
    """Collects each MoE layer's top-k ids (optionally router logits) per step.

    logits  also keep the router logits (float32 [tokens, experts])
    stream  a text file: each forward writes one route-hist JSON line per
            layer right away ({"kind":"route","layer","step","rank","topk"})
            instead of keeping the ids in memory
    rank    source rank written into stream records (EP-local rank of this
            process when tracing a distributed job)
    """

    def __init__(self, logits: bool = False, stream: IO[str] | None = None, rank: int = 0):
        self.logits = logits
        self.stream = stream
        self.rank = rank
        self.current_step = 0
        #: bool/int [batch, seq] or [tokens]: rows with 0 are padding and dropped
        self.token_mask = None
        self._topk: dict[int, list[np.ndarray]] = {}
        self._logits: dict[int, list[np.ndarray]] = {}
        self._steps: set[int] = set()
        self._handles = []
        self._restore = []

    # -- attaching -------------------------------------------------------

    def attach_hf(self, model) -> "RouterTrace":
        """Hook the router module of every MoE decoder layer of a transformers
        model. L is the decoder-layer index from the module path
        (`...layers.{L}.mlp.gate`), so dense layers leave gaps."""
        found = 0
        for name, mod in model.named_modules():
            m = _LAYER.search(name + ".")
            if m is None or not name.endswith(".gate") or not _is_router(mod):
                continue
            layer = int(m.group(1))
            self._handles.append(mod.register_forward_hook(self._hf_hook(layer)))
            found += 1
        if not found:
            raise ValueError(
                f"{type(model).__name__}: no MoE router modules (`layers.N.*.gate` returning "
                "(logits, weights, ids)); ftk.trace needs transformers >= 5 MoE models "
                "(Mixtral, Qwen2/Qwen3-MoE, DeepSeek-V2/V3, ...)"
            )
        return self

    def attach_megatron(self, model, layer_offset: int = 0) -> "RouterTrace":
        """Hook every Megatron-Core TopKRouter in `model` (a module tree).

        In a Megatron training script (pretrain_gpt.py style):

            from ftk.trace import RouterTrace
            f = open(f"route-rank{rank}.jsonl", "w", buffering=1)
            tr = RouterTrace(stream=f, rank=parallel_state.get_expert_model_parallel_rank())
            for chunk in model:                  # the list of model chunks
                tr.attach_megatron(chunk)
            ... in the loop:  tr.current_step = iteration
            $ cat route-rank*.jsonl | route-hist --experts E --ep N

        The layer index is TopKRouter.layer_number - 1 + layer_offset (use the
        pipeline stage's first layer as offset when layer_number is local).
        The ids are the router's routing_map (or top-k indices in older
        releases). With logits=True the router's `gating` method is wrapped to
        keep its output.
        """
        found = 0
        for _, mod in model.named_modules():
            if type(mod).__name__ != "TopKRouter" and not _is_megatron_router(mod):
                continue
            layer = int(getattr(mod, "layer_number", 1) or 1) - 1 + layer_offset
            state = {}
            if self.logits and hasattr(mod, "gating"):
                orig = mod.gating
                own = "gating" in vars(mod)

                def gating(x, _orig=orig, _state=state):
                    out = _orig(x)
                    _state["logits"] = out
                    return out

                mod.gating = gating
                self._restore.append((mod, orig if own else None))
            self._handles.append(mod.register_forward_hook(self._megatron_hook(layer, state)))
            found += 1
        if not found:
            raise ValueError(f"{type(model).__name__}: no Megatron-Core TopKRouter modules")
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        for mod, orig in self._restore:
            if orig is None:
                del mod.gating  # back to the class's method
            else:
                mod.gating = orig
        self._handles.clear()
        self._restore.clear()

    # -- recording -------------------------------------------------------

    @contextlib.contextmanager
    def step(self, n: int):
        """Record the forwards inside under step n."""
        prev, self.current_step = self.current_step, int(n)
        try:
            yield self
        finally:
            self.current_step = prev

    def _keep(self, rows: int):
        m = self.token_mask
        if m is None:
            return None
        m = _to_numpy(m).reshape(-1).astype(bool)
        if m.size != rows:
            raise ValueError(f"token_mask has {m.size} entries but the router saw {rows} tokens")
        return m

    def _record(self, layer: int, ids, logits) -> None:
        ids = _to_numpy(ids)
        keep = self._keep(ids.shape[0])
        if keep is not None:
            ids = ids[keep]
        if self.stream is not None:
            rec = {"kind": "route", "layer": layer, "step": self.current_step, "rank": self.rank, "topk": ids.tolist()}
            self.stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
        else:
            self._topk.setdefault(layer, []).append(ids.astype(np.int64, copy=False))
            self._steps.add(self.current_step)
        if self.logits and logits is not None:
            lg = _to_numpy(logits, float32=True)
            if keep is not None:
                lg = lg[keep]
            self._logits.setdefault(layer, []).append(lg)

    def _hf_hook(self, layer: int):
        def hook(_mod, _inp, out):
            logits, _weights, ids = out[0], out[1], out[2]
            self._record(layer, ids, logits)

        return hook

    def _megatron_hook(self, layer: int, state: dict):
        def hook(mod, _inp, out):
            second = out[1]
            if second.dtype == _torch().bool:
                # routing_map [tokens, experts]: exactly k per row unless the
                # router dropped tokens for capacity.
                k = int(getattr(mod, "topk", 0) or getattr(getattr(mod, "config", None), "moe_router_topk", 0))
                per_row = second.sum(dim=-1)
                if k == 0:
                    k = int(per_row.max())
                if bool((per_row != k).any()):
                    raise ValueError(
                        "TopKRouter dropped tokens for capacity (rows with fewer than top-k experts); "
                        "trace with moe_expert_capacity_factor=None to record the full demand"
                    )
                ids = second.nonzero()[:, 1].reshape(-1, k)
            else:
                ids = second
            self._record(layer, ids, state.pop("logits", None))

        return hook

    # -- output ----------------------------------------------------------

    def layers(self) -> list[int]:
        return sorted(self._topk)

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for L in sorted(self._topk):
            out[f"layer.{L}.topk"] = np.concatenate(self._topk[L], axis=0)
        for L in sorted(self._logits):
            out[f"layer.{L}.logits"] = np.concatenate(self._logits[L], axis=0)
        return out

    def save(self, path: str | Path, step: int | None = None) -> dict[str, np.ndarray]:
        """Write route-hist's safetensors layout (atomically) and return it;
        metadata "step" is `step`, else the step the data was recorded under."""
        t = self.tensors()
        if not t:
            raise ValueError("nothing recorded: run a forward pass with the trace attached first")
        if step is None:
            if len(self._steps) > 1:
                raise ValueError(
                    f"recorded steps {sorted(self._steps)}: one safetensors file holds one step; "
                    "save() and clear() after each step, or stream JSON lines"
                )
            step = next(iter(self._steps))
        items = []
        for name, a in t.items():
            a = np.ascontiguousarray(a)
            items.append((name, _stio.st_dtype(a.dtype), a.shape, memoryview(a).cast("B")))
        meta = {"step": str(int(step)), "producer": "ftk.trace"}
        _stio.write(path, items, metadata=meta)
        return t

    def clear(self) -> None:
        self._steps.clear()
        self._topk.clear()
        self._logits.clear()


def _torch():
    import torch

    return torch


def _to_numpy(t, float32: bool = False) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    t = t.detach()
    if float32:
        t = t.float()
    return t.cpu().numpy()


def _is_router(mod) -> bool:
    n = type(mod).__name__.lower()
    return "router" in n


def _is_megatron_router(mod) -> bool:
    try:
        from megatron.core.transformer.moe.router import TopKRouter  # type: ignore
    except Exception:
        return False
    return isinstance(mod, TopKRouter)


# -- command line ------------------------------------------------------------


def _batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    for a in range(0, n, size):
        yield a, min(n, a + size)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m ftk.trace",
        description="Run a Hugging Face MoE model folder over text and write its router top-k ids "
        "(route-hist's safetensors layout, or JSON lines for a .jsonl/- output).",
    )
    p.add_argument("--model", required=True, help="model folder (config.json + weights [+ tokenizer])")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt per line (the folder's tokenizer)")
    src.add_argument("--token-ids", help="safetensors with input_ids [B, S] int64 (optional attention_mask)")
    p.add_argument("-o", "--output", required=True, help="trace.safetensors, or .jsonl / - for JSON lines")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="truncate prompts to this many tokens")
    p.add_argument("--logits", action="store_true", help="also store router logits (layer.{L}.logits)")
    p.add_argument("--step", type=int, default=0, help="step number recorded in the trace")
    p.add_argument("--step-per-batch", action="store_true", help="each batch is its own step (step, step+1, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    a = p.parse_args(argv)

    def fail(where: str, what: str, todo: str) -> int:
        print(f"ftk.trace: error: {where}: {what}; {todo}", file=sys.stderr)
        return 2

    if a.batch_size < 1 or a.max_length < 1:
        return fail("--batch-size/--max-length", "must be at least 1", "give positive values")
    jsonl = a.output == "-" or a.output.endswith(".jsonl")
    if a.step_per_batch and not jsonl:
        return fail("--step-per-batch", "needs a JSON-lines output (one safetensors file holds one step)", "use -o trace.jsonl")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        return fail("import", str(e), "pip install 'ftk[transformers]'")
    mdir = Path(a.model)
    if not (mdir / "config.json").is_file():
        return fail(a.model, "no config.json", "give a Hugging Face model folder")
    if a.prompts is not None:
        try:
            prompts = [ln.rstrip("\n") for ln in open(a.prompts, encoding="utf-8") if ln.strip()]
        except OSError as e:
            return fail(a.prompts, e.strerror or str(e), "give a readable text file")
        if not prompts:
            return fail(a.prompts, "no prompts", "write one prompt per line")
        try:
            tok = AutoTokenizer.from_pretrained(mdir)
        except Exception as e:  # noqa: BLE001 - any loader failure means no usable tokenizer
            return fail(a.model, f"no usable tokenizer ({type(e).__name__})", "use --token-ids FILE instead of --prompts")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=a.max_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        try:
            from safetensors.torch import load_file

            t = load_file(a.token_ids)
        except Exception as e:  # noqa: BLE001
            return fail(a.token_ids, f"not a readable safetensors file ({e})", "give input_ids [B, S] int64")
        if "input_ids" not in t or t["input_ids"].ndim != 2:
            return fail(a.token_ids, "no 2-D 'input_ids' tensor", "store input_ids [B, S] int64")
        ids = t["input_ids"].long()[:, : a.max_length]
        mask = t.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask[:, : a.max_length]
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=dtype).to(a.device).eval()
    out_f = None
    if jsonl:
        out_f = sys.stdout if a.output == "-" else open(a.output + ".tmp", "w")
    tr = RouterTrace(logits=a.logits and not jsonl, stream=out_f)
    try:
        tr.attach_hf(model)
    except ValueError as e:
        return fail(a.model, str(e), "use a transformers MoE model")
    with torch.no_grad():
        for i, (lo, hi) in enumerate(_batches(ids.shape[0], a.batch_size)):
            tr.token_mask = mask[lo:hi]
            tr.current_step = a.step + (i if a.step_per_batch else 0)
            model(input_ids=ids[lo:hi].to(a.device), attention_mask=mask[lo:hi].to(a.device))
    tr.detach()
    if jsonl:
        if out_f is not sys.stdout:
            out_f.close()
            Path(a.output + ".tmp").replace(a.output)
        else:
            out_f.flush()
    else:
        tr.save(a.output, step=a.step)
    n = int(mask.sum())
    print(json.dumps({"kind": "trace", "model": str(mdir), "tokens": n, "layers": tr.layers() or None, "output": a.output}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
