"""The GPU check: parity on the device, the paper's speed protocol and training steps, in one run.

Sections, each with a deadline inside ``--budget_s`` (rows run in priority order; a row that no
longer fits is recorded as skipped, one still running at the deadline is stopped):

* ``parity``: the fixtures on the device in fp32 (logits within 1e-4, greedy tokens of every
  decoding mode), the VQ fixture, and the greedy agreement of the modes and of bf16 on a larger model;
* ``decode``: random weights of the released shapes, CFG 4, bf16 weights and caches: latency at
  batch 1 and images/s at batch 64 (warm-up, then timed runs with CUDA events), tokens only and
  with VQ decoding, peak memory, for the modes ``eager``, ``graph`` (the whole decode as one CUDA
  graph), ``compiled`` (``compile="reduce-overhead"``: each step a compiled CUDA graph) and
  ``compiled_graph`` (compiled steps inside one whole-decode CUDA graph); the VQ decoder alone;
  text-to-image at 1024 px (LPD-L width, a 120-token prompt, 4,096 tokens in 64 steps);
* ``train``: a bf16 training step of LPD-L-256 at batch 64, flex attention vs SDPA with the dense
  mask, with and without gradient checkpointing;
* ``released`` (with ``--released_repo``): the released sampler with the same weights.

Writes ``OUT/results.json`` and ``OUT/table.md`` after every row, and ``OUT/gpu_check.png`` at
the end. A failure of any kind (missing capability, compile error, deadline) is a row with its
error; the exit status is 1 only when a parity check gives a wrong result. ``--dry_run`` runs
the same plan with tiny shapes on a CPU in seconds.

    bash benchmarks/gpu_check.sh OUT_DIR [--released_repo DIR]
    python benchmarks/gpu_check.py --out OUT_DIR --dry_run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch._dynamo  # imported here, not half-way through a row that its deadline stops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    MODELS,
    PeakMemory,
    build_model,
    build_released,
    describe_host,
    event_times,
    host_info,
    load_released,
    sync,
)
from bench_sampling import make_inputs, released_fn  # noqa: E402
from bench_train import ours_step  # noqa: E402

from lpd.files import atomic_write_bytes  # noqa: E402
from lpd.models import build_lpd  # noqa: E402
from lpd.sampling import Decoder, SamplingConfig, sample_tokens, teacher_forced_logits  # noqa: E402
from lpd.schedules import group_sizes  # noqa: E402
from lpd.tokenizer import build_vq  # noqa: E402

SECTIONS = ("parity", "decode", "train", "released")
SHARES = {
    "parity": 0.12,
    "decode": 0.60,
    "train": 0.20,
    "released": 0.08,
}  # of the budget, in this order
MODES = ("eager", "graph", "compiled", "compiled_graph")
TOL = 1e-4  # fp32 logits on the device vs the fixtures
SAMPLING = SamplingConfig(cfg=4.0)  # linear CFG 4, temperature 1, no top-k / top-p
FIXTURES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures"
)


@dataclass(frozen=True)
class Scale:
    """Shapes and repetitions of a run: the paper's (``FULL``) or tiny ones for a CPU (``DRY``)."""

    models: dict[str, dict[str, Any]]  # L / XL / XXL -> build_lpd keyword arguments
    img: dict[int, int]  # the paper's image size -> the size run
    batch: dict[int, int]  # the paper's batch (1: latency, 64: throughput) -> the batch run
    warmup: dict[int, int]  # per paper batch
    reps: dict[int, int]
    seconds: dict[int, float]  # most timed seconds per row
    check_model: dict[str, Any]  # the model of the greedy-agreement checks
    vq: dict[str, Any]
    compile: dict[str, Any]  # mode -> torch.compile options
    compile_s: float  # expected compilation seconds of an LPD-L step
    setup_s: float  # building a model, inputs, a first call
    compile_others: (
        bool  # compiled rows beyond LPD-L-256 (on a CPU they repeat its code path, a second each)
    )
    budget_s: float


T2I = dict(condition="text", max_text_tokens=120)  # the text-to-image row: a 120-token prompt
FULL = Scale(
    models={
        **{k: MODELS[k] for k in ("L", "XL", "XXL")},
        "T2I-L": {**MODELS["L"], **T2I, "text_dim": 2048},  # FLAN-T5-XL features
    },
    img={256: 256, 512: 512, 1024: 1024},
    batch={1: 1, 64: 64},
    warmup={1: 10, 64: 3},
    reps={1: 100, 64: 20},
    seconds={1: 3.0, 64: 4.0},
    check_model=MODELS["tiny"],
    vq={},
    compile={"compiled": "reduce-overhead", "compiled_graph": True},
    compile_s=60.0,
    setup_s=2.0,
    compile_others=True,
    budget_s=450.0,
)
_TINY = dict(vocab_size=64, class_num=10)
DRY = Scale(
    models={
        "L": dict(embed_dim=32, depth=2, num_heads=4, **_TINY),
        "XL": dict(embed_dim=48, depth=2, num_heads=4, **_TINY),
        "XXL": dict(embed_dim=64, depth=3, num_heads=4, **_TINY),
        "T2I-L": dict(embed_dim=32, depth=2, num_heads=4, **_TINY, **T2I, text_dim=16),
    },
    img={256: 80, 512: 96, 1024: 128},
    batch={1: 1, 64: 3},
    warmup={1: 1, 64: 1},
    reps={1: 2, 64: 2},
    seconds={1: 0.1, 64: 0.1},
    check_model=dict(embed_dim=32, depth=2, num_heads=4, **_TINY),
    vq=dict(ch=32, z_channels=32, codebook_size=64, num_res_blocks=1),
    compile={"compiled": {"backend": "eager"}, "compiled_graph": {"backend": "eager"}},
    compile_s=1.0,
    setup_s=0.1,
    compile_others=False,
    budget_s=90.0,
)


class Deadline(BaseException):
    """Time is up (a BaseException, so no ``except Exception`` on the way swallows it)."""


TERMINATED = "terminated (SIGTERM): the outer time limit was reached"
_stop = {"why": ""}  # set by SIGTERM


def _interrupt(signum: int, frame: Any) -> None:
    """SIGALRM (a section's deadline) and SIGTERM: raise :class:`Deadline`, but never inside an
    import (a half-imported module stays broken for the rest of the run): retry 50 ms later."""
    if signum == signal.SIGTERM:
        _stop["why"] = TERMINATED
    f = frame
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        f = f.f_back
    raise Deadline(_stop["why"] or "the section deadline passed")


@contextlib.contextmanager
def alarm(end: float) -> Iterator[None]:
    """Raise :class:`Deadline` in this thread at ``time.monotonic() == end`` (or on SIGTERM)."""
    signal.setitimer(signal.ITIMER_REAL, max(end - time.monotonic(), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if _stop["why"]:  # a SIGTERM whose retry the disarming cancelled
        raise Deadline(_stop["why"])


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 in matrix products and convolutions (the parity checks need full fp32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fresh_compile() -> None:
    """Forget compiled code, so a row compiles on its own (each row has its own decoder)."""
    torch._dynamo.reset()


def counters() -> dict[str, int]:
    from torch._dynamo.utils import counters as c

    return {
        "graphs": c["stats"]["unique_graphs"],
        "cudagraph_skips": c["inductor"]["cudagraph_skips"],
        "cudagraph_recordings": c["inductor"]["cudagraph_recorded_non_static_inputs"],
    }


def peak_gb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call: CUDA ``max_memory_allocated`` (weights included); CPU: resident-set growth."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 1e9
    with PeakMemory(device) as pm:
        fn()
    return None if pm.peak_bytes is None else pm.peak_bytes / 1e9


def timing(fn: Callable[[], Any], device: torch.device, scale: Scale, batch: int) -> dict[str, Any]:
    """First call (compilation / capture included), warm-up, timed calls, then peak memory.
    ``counters_timed``: what torch.compile did during the timed calls (all 0 when nothing recompiles)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    stop = time.perf_counter() + scale.seconds[batch] / 2
    for _ in range(scale.warmup[batch] - 1):
        if time.perf_counter() > stop:
            break
        fn()
    before = counters()
    t = event_times(fn, device, 0, scale.reps[batch], scale.seconds[batch])
    after = counters()
    return {
        "first_s": first,
        "ms": 1e3 * statistics.median(t),
        "mean_ms": 1e3 * statistics.fmean(t),
        "min_ms": 1e3 * min(t),
        "runs": len(t),
        "peak_gb": peak_gb(fn, device),
        "counters_timed": {k: after[k] - before[k] for k in after},
    }


# ---------------------------------------------------------------------------------------------
# Decoding in each mode
# ---------------------------------------------------------------------------------------------


def vq_decoder(
    vq: torch.nn.Module | None, grid: int, channels_last: bool
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Tokens ``[B, N]`` -> images, without the range check of :meth:`VQModel.decode` (it waits on the device)."""
    if vq is None:
        return None

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = vq.quantize.lookup(tokens.view(-1, grid, grid))
            return vq.decode_quant(
                q.contiguous(memory_format=torch.channels_last) if channels_last else q
            )

    return decode


def sampler(
    model: torch.nn.Module,
    labels: torch.Tensor,
    orders: torch.Tensor,
    sizes: list[int],
    mode: str,
    scale: Scale,
    *,
    greedy: bool = False,
    amp: torch.dtype | None = None,
    sampling: SamplingConfig = SAMPLING,
    images: Callable[[torch.Tensor], torch.Tensor] | None = None,
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Callable[[], torch.Tensor], str]:
    """One call decoding the batch in ``mode`` (and its images with ``images``), and a note; one
    :class:`Decoder` serves every call (its plans and static KV cache are reused). ``text``:
    caption features and mask of a text model, instead of ``labels``."""
    device = orders.device
    comp = scale.compile[mode] if mode.startswith("compiled") else False
    decoder = Decoder(model, sampling, greedy=greedy, compile=comp, autocast_dtype=amp)
    if mode in ("eager", "compiled") and text is None:

        def run() -> torch.Tensor:
            tokens = decoder.sample(labels, orders, sizes)
            if images is None:
                return tokens
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                return images(tokens)

        return run, ""
    B = orders.shape[0]
    labels_in, orders_in = labels.clone(), orders.clone()

    def body() -> torch.Tensor:  # no input checks (as in Decoder.sample): they wait on the device
        if text is None:
            prefix, mask = decoder.class_prefix(labels_in, B), None
        else:
            prefix, mask = decoder.text_prefix(*text)
        gen = decoder.decode(prefix, orders_in, sizes, prefix_mask=mask)
        tokens = torch.empty_like(gen).scatter_(1, orders_in, gen)
        if images is None:
            return tokens
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return images(tokens)

    if mode in ("eager", "compiled"):
        return body, ""
    if device.type != "cuda":
        return body, "not captured (no CUDA)"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # compile, build the step plan, initialise cuBLAS outside the capture
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()

    def replay() -> torch.Tensor:
        labels_in.copy_(labels)
        orders_in.copy_(orders)
        graph.replay()
        return out

    return replay, ""


class Context:
    """Models, VQ decoders and reference tokens shared by the rows of a run (one model size at a time)."""

    def __init__(self, args: argparse.Namespace, scale: Scale, device: torch.device):
        self.args, self.scale, self.device = args, scale, device
        self._models: dict[tuple, torch.nn.Module] = {}
        self._vqs: dict[str, torch.nn.Module] = {}
        self.tokens: dict[tuple, torch.Tensor] = {}
        self.best_vq: dict[tuple[int, int], tuple[str, float]] = {}
        self.compile_s_per_block = (
            scale.compile_s / scale.models["L"]["depth"]
        )  # raised to what is measured
        self.released: Any = None

    def model(self, name: str, img: int, dtype: str) -> torch.nn.Module:
        """``name``: L, XL, XXL or ``check``; ``dtype``: ``bf16`` (weights and caches) or ``fp32``.
        Only one architecture is kept at a time."""
        if not any(k[:2] == (name, img) for k in self._models):
            self.drop_models()
        if (name, img, dtype) not in self._models:
            models = {**self.scale.models, "check": self.scale.check_model}
            m = build_model(name, self.scale.img[img], self.device, self.args.seed, models)
            self._models[(name, img, dtype)] = m.to(torch.bfloat16) if dtype == "bf16" else m
        return self._models[(name, img, dtype)]

    def drop_models(self) -> None:
        self._models.clear()
        self.tokens.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def vq(self, variant: str) -> torch.nn.Module:
        if "fp32" not in self._vqs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.args.seed)
                self._vqs["fp32"] = build_vq(**self.scale.vq).to(self.device).eval()
        if variant not in self._vqs and variant != "autocast":
            vq = copy.deepcopy(self._vqs["fp32"]).to(torch.bfloat16)
            self._vqs[variant] = (
                vq.to(memory_format=torch.channels_last) if variant == "bf16_cl" else vq
            )
        return self._vqs["fp32" if variant == "autocast" else variant]

    def expected_compile_s(self, name: str) -> float:
        return self.compile_s_per_block * self.scale.models[name]["depth"]


# ---------------------------------------------------------------------------------------------
# The rows of each section
# ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    """A planned measurement: ``run()`` returns its rows (dicts of fields added to ``fields``)."""

    section: str
    case: str
    fields: dict[str, Any]
    run: Callable[[], list[dict[str, Any]]]
    est_s: Callable[[], float]


def check_row(what: str, value: float, tol: float) -> dict[str, Any]:
    return {
        "check": f"{what} max|d| {value:.1e} (<= {tol:g})",
        "value": value,
        "status": "ok" if value <= tol else "fail",
    }


def same_tokens_row(
    got: list[torch.Tensor], want: list[torch.Tensor], strict: bool
) -> dict[str, Any]:
    agree = sum(int((g.cpu() == w.cpu()).sum()) for g, w in zip(got, want)) / sum(
        w.numel() for w in want
    )
    identical = all(torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want))
    status = "ok" if identical or not strict else "fail"
    return {
        "check": "greedy tokens identical"
        if identical
        else f"greedy tokens agree {100 * agree:.2f}%",
        "agreement": agree,
        "status": status,
    }


def parity_items(ctx: Context) -> list[Item]:
    device, scale = ctx.device, ctx.scale
    fx: dict[str, Any] = {}

    def fixture() -> tuple[dict[str, Any], torch.nn.Module]:
        if not fx:
            fx.update(
                torch.load(
                    os.path.join(FIXTURES, "lpd_parity_8x8.pt"),
                    weights_only=True,
                    map_location=device,
                )
            )
        model = build_lpd(**fx["config"]).to(device)
        model.load_state_dict(fx["state_dict"], strict=True)
        return fx, model.eval()

    def logits() -> list[dict[str, Any]]:
        f, model = fixture()
        with exact_fp32(), torch.no_grad():
            got = model.logits(f["tokens"], f["labels"], f["orders"], f["group_sizes"])
            loss = model(f["tokens"], f["labels"], f["orders"], f["group_sizes"]).item()
            ref = f["greedy_sampling"][1]
            steps = teacher_forced_logits(
                model, ref["tokens"], f["labels"], f["orders"], f["group_sizes"], cfg=ref["cfg"]
            )
        return [
            check_row(
                "training logits", (got - f["train_logits_in_order"]).abs().max().item(), TOL
            ),
            check_row("training loss", abs(loss - f["train_loss"].item()), TOL),
            check_row(
                "cached step outputs (CFG 3)",
                (steps - torch.cat(ref["step_head_outputs"], 1)).abs().max().item(),
                TOL,
            ),
        ]

    def greedy_fixture(mode: str) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            if mode.startswith("compiled"):
                fresh_compile()
            f, model = fixture()
            got, want = [], []
            with exact_fp32():
                for ref in f["greedy_sampling"]:
                    s = SamplingConfig(cfg=float(ref["cfg"]), cfg_schedule=ref["cfg_schedule"])
                    fn, note = sampler(
                        model,
                        f["labels"],
                        f["orders"],
                        [int(g) for g in f["group_sizes"]],
                        mode,
                        scale,
                        greedy=True,
                        sampling=s,
                    )
                    got.append(fn().clone())
                    want.append(ref["tokens"])
            return [{**same_tokens_row(got, want, strict=True), "note": note}]

        return run

    def vq_fixture() -> list[dict[str, Any]]:
        p = torch.load(
            os.path.join(FIXTURES, "vq_parity_tiny.pt"), weights_only=True, map_location=device
        )
        vq = build_vq(**p["config"]).to(device).eval()
        vq.load_state_dict(p["state_dict"])
        B, _, h, w = p["quant"].shape
        with exact_fp32(), torch.no_grad():
            out = vq.decode(p["indices"].view(B, h, w))
        return [check_row("VQ decoding", (out - p["decoded"]).abs().max().item(), TOL)]

    def agreement(mode: str, dtype: str) -> Callable[[], list[dict[str, Any]]]:
        """Greedy tokens of ``mode`` in ``dtype`` against eager fp32 decoding (random weights: near-ties are common)."""

        def run() -> list[dict[str, Any]]:
            if mode.startswith("compiled"):
                fresh_compile()
            img, steps, batch = 256, 20, 2
            m32 = ctx.model("check", img, "fp32")
            labels, orders = make_inputs(
                batch, m32.num_tokens, m32.class_num, device, ctx.args.seed
            )
            sizes = group_sizes(scale.img[img], steps)
            key = ("check", "fp32")
            with exact_fp32():
                if key not in ctx.tokens:
                    ctx.tokens[key] = sampler(
                        m32, labels, orders, sizes, "eager", scale, greedy=True
                    )[0]().clone()
                model = m32 if dtype != "bf16" else ctx.model("check", img, "bf16")
                amp = torch.bfloat16 if dtype == "autocast" else None
                fn, note = sampler(model, labels, orders, sizes, mode, scale, greedy=True, amp=amp)
                row = same_tokens_row([fn()], [ctx.tokens[key]], strict=False)
            return [{**row, "note": note}]

        return run

    fixed = lambda s: lambda: s  # noqa: E731
    items = [
        Item("parity", "fixture 8x8: logits", {"mode": "eager", "dtype": "fp32"}, logits, fixed(2)),
        Item(
            "parity",
            "VQ fixture: decoding",
            {"mode": "eager", "dtype": "fp32"},
            vq_fixture,
            fixed(2),
        ),
    ]
    items += [
        Item(
            "parity",
            "fixture 8x8: greedy tokens",
            {"mode": m, "dtype": "fp32"},
            greedy_fixture(m),
            fixed(scale.compile_s / 4 if m.startswith("compiled") else 1),
        )
        for m in MODES
    ]
    items += [
        Item(
            "parity",
            "random model: greedy vs eager fp32",
            {"mode": m, "dtype": d},
            agreement(m, d),
            fixed(scale.compile_s / 3 if m.startswith("compiled") else 2),
        )
        for m, d in [
            ("graph", "fp32"),
            ("eager", "bf16"),
            ("eager", "autocast"),
            ("graph", "bf16"),
            ("compiled", "fp32"),
            ("compiled_graph", "fp32"),
        ]
    ]
    return items


def decode_items(ctx: Context) -> list[Item]:
    device, scale = ctx.device, ctx.scale

    def vq_row(img: int, batch: int, variant: str) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            vq, grid = ctx.vq(variant), scale.img[img] // 16
            tokens = torch.randint(
                0, vq.codebook_size, (scale.batch[batch], grid * grid), device=device
            )
            decode = vq_decoder(vq, grid, variant == "bf16_cl")

            def fn() -> torch.Tensor:
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=variant == "autocast"
                ):
                    return decode(tokens)

            row = {**timing(fn, device, scale, batch)}
            row["img_s"] = scale.batch[batch] / (row["ms"] / 1e3)
            if variant.startswith("bf16"):
                best = ctx.best_vq.get((img, batch))
                if best is None or row["ms"] < best[1]:
                    ctx.best_vq[(img, batch)] = (variant, row["ms"])
            return [row]

        return run

    def decode_row(
        name: str,
        img: int,
        steps: int,
        batch: int,
        mode: str,
        dtype: str = "bf16",
        vq: bool = False,
        agree: bool = False,
    ) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            if mode.startswith("compiled"):
                fresh_compile()
            model = ctx.model(name, img, "fp32" if dtype == "autocast" else dtype)
            N, B = model.num_tokens, scale.batch[batch]
            sizes = group_sizes(scale.img[img], min(steps, N))
            labels, orders = make_inputs(B, N, model.class_num, device, ctx.args.seed)
            amp = torch.bfloat16 if dtype == "autocast" else None
            text = None
            if model.text is not None:  # a prompt of max_text_tokens rows of random features
                c, g = model.config, torch.Generator().manual_seed(ctx.args.seed)
                features = torch.randn(B, c.max_text_tokens, c.text_dim, generator=g)
                mask = torch.ones(B, c.max_text_tokens, dtype=torch.bool, device=device)
                text = (features.to(device), mask)
            rows = []
            for with_vq in (False, True) if vq else (False,):
                images = None
                if with_vq:
                    variant = (
                        "fp32"
                        if dtype == "fp32"
                        else "autocast"
                        if dtype == "autocast"
                        else ctx.best_vq.get((img, batch), ("bf16",))[0]
                    )
                    images = vq_decoder(ctx.vq(variant), model.grid_size, variant == "bf16_cl")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fn, note = sampler(
                        model, labels, orders, sizes, mode, scale, amp=amp, images=images, text=text
                    )
                    row = timing(fn, device, scale, batch)
                fell_back = [
                    str(w.message)
                    for w in caught
                    if "torch.compile of the decoding step failed" in str(w.message)
                ]
                if fell_back:
                    raise RuntimeError(fell_back[0])
                if mode.startswith("compiled") and not rows:
                    ctx.compile_s_per_block = max(
                        ctx.compile_s_per_block, row["first_s"] / model.config.depth
                    )
                notes = [note] + [f"{k} while timed" for k, v in row["counters_timed"].items() if v]
                note = "; ".join(n for n in notes if n)
                row.update(
                    vq=with_vq,
                    img_s=B / (row["ms"] / 1e3),
                    note=note,
                    params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                )
                if with_vq:
                    row["vq_variant"] = variant
                if text is not None:
                    row.update(tokens=N, prompt_rows=text[1].shape[1])
                rows.append(row)
            if (
                agree
            ):  # greedy tokens of this mode against eager decoding, same weights, and against fp32
                for ref_dtype in dict.fromkeys([dtype, "fp32"]):
                    key = (name, img, steps, batch, ref_dtype)
                    if key not in ctx.tokens:
                        ref_model = ctx.model(
                            name, img, "fp32" if ref_dtype == "autocast" else ref_dtype
                        )
                        with exact_fp32():
                            ref_amp = torch.bfloat16 if ref_dtype == "autocast" else None
                            ctx.tokens[key] = sampler(
                                ref_model,
                                labels,
                                orders,
                                sizes,
                                "eager",
                                scale,
                                greedy=True,
                                amp=ref_amp,
                            )[0]().clone()
                    got = sampler(model, labels, orders, sizes, mode, scale, greedy=True, amp=amp)[
                        0
                    ]()
                    a = same_tokens_row([got], [ctx.tokens[key]], strict=False)
                    rows[0].setdefault("agreement_with", {})[f"eager {ref_dtype}"] = a["agreement"]
                rows[0]["check"] = ", ".join(
                    f"{100 * v:.1f}% = {k}" for k, v in rows[0]["agreement_with"].items()
                )
            return rows

        return run

    def item(
        name: str,
        img: int,
        steps: int,
        batch: int,
        mode: str,
        dtype: str = "bf16",
        vq: bool = False,
        agree: bool = False,
    ) -> Item:
        fields = dict(model=name, img=img, steps=steps, batch=batch, mode=mode, dtype=dtype)
        base = 2 * (scale.seconds[batch] + scale.setup_s) * (2 if vq else 1)
        est = (
            (lambda: base + ctx.expected_compile_s(name))
            if mode.startswith("compiled")
            else (lambda: base)
        )
        return Item(
            "decode",
            f"{name}-{img} {steps} steps b{batch}" + (" 120-token prompt" if "T2I" in name else ""),
            fields,
            decode_row(name, img, steps, batch, mode, dtype, vq, agree),
            est,
        )

    def vq_item(img: int, batch: int, variant: str) -> Item:
        fields = dict(model="VQ-16", img=img, batch=batch, mode="eager", dtype=variant)
        return Item(
            "decode",
            f"VQ decoder {img} px b{batch}",
            fields,
            vq_row(img, batch, variant),
            lambda: 2 * scale.seconds[batch] + scale.setup_s,
        )

    # In priority order: the goal cases, then the other shapes; a compilation costs about a minute.
    fast, compiled = ("eager", "graph"), ("compiled_graph", "compiled")
    others = [("XL", 256, 20), ("XXL", 256, 20), ("L", 256, 32), ("L", 512, 48), ("XL", 512, 48)]
    items = [vq_item(256, b, v) for b in (1, 64) for v in ("bf16", "bf16_cl")]
    items += [item("L", 256, 20, b, m, vq=True, agree=b == 1) for b in (1, 64) for m in fast]
    items += [item("L", 256, 256, 1, m) for m in fast]
    items += [item("L", 256, 20, 1, "compiled_graph", vq=True, agree=True)]
    items += [item("T2I-L", 1024, 64, 1, m, vq=True) for m in fast]  # 4,096 tokens, a prompt
    items += [
        item(n, i, s, b, "graph", vq=(n, i) == ("L", 512)) for n, i, s in others for b in (1, 64)
    ]
    items += [item("L", 256, 20, 1, "compiled", vq=True, agree=True)]
    items += [item("L", 256, 20, 64, m, vq=True) for m in compiled] + [
        item("L", 256, 256, 1, m) for m in compiled
    ]
    items += [item(n, i, s, b, "eager") for n, i, s in others for b in (1, 64)]
    items += [
        vq_item(i, b, v)
        for i, b, v in [
            (256, 1, "fp32"),
            (256, 64, "fp32"),
            (256, 1, "autocast"),
            (256, 64, "autocast"),
        ]
    ]
    items += [vq_item(512, b, v) for b in (1, 64) for v in ("bf16", "bf16_cl")]
    items += [item("L", 256, 20, 1, m, dtype="autocast") for m in fast]
    if scale.compile_others:
        items += [item(n, i, s, b, m) for n, i, s in others for b in (1, 64) for m in compiled]
    return items


def train_items(ctx: Context) -> list[Item]:
    device, scale = ctx.device, ctx.scale

    def run_row(attn: str, ckpt: bool) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            ctx.drop_models()
            model = build_model("L", scale.img[256], device, ctx.args.seed, scale.models)
            model.set_attn_impl(attn)
            model.set_grad_checkpointing(ckpt)
            B, N, sizes = scale.batch[64], model.num_tokens, group_sizes(scale.img[256], 20)
            g = torch.Generator().manual_seed(ctx.args.seed)
            tokens = torch.randint(0, model.vocab_size, (B, N), generator=g).to(device)
            labels = torch.randint(0, model.class_num, (B,), generator=g).to(device)
            orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]).to(device)
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=torch.bfloat16),
            ):  # same weights and inputs in every row
                eval_loss = model(tokens, labels, orders, sizes).item()
            model.train()
            step = ours_step(
                model,
                tokens,
                labels,
                [sizes],
                "bf16",
                "fused" if device.type == "cuda" else "adamw",
                False,
            )
            row = timing(step, device, scale, 64)
            return [
                {
                    **row,
                    "tok_s": B * N / (row["ms"] / 1e3),
                    "img_s": B / (row["ms"] / 1e3),
                    "eval_loss": eval_loss,
                    "check": f"eval loss {eval_loss:.4f}",
                }
            ]

        return run

    return [
        Item(
            "train",
            "L-256 training step b64",
            dict(
                model="L",
                img=256,
                batch=64,
                attn=a,
                checkpointing=c,
                mode=a + (" +ckpt" if c else ""),
                dtype="bf16",
            ),
            run_row(a, c),
            (
                lambda a=a: (
                    5 * scale.setup_s
                    + 2 * scale.seconds[64]
                    + (scale.compile_s / 2 if a == "flex" else 0)
                )
            ),
        )
        for a, c in [("sdpa", False), ("flex", False), ("sdpa", True), ("flex", True)]
    ]


def released_items(ctx: Context) -> list[Item]:
    device, scale = ctx.device, ctx.scale

    def setup() -> tuple[Any, torch.nn.Module]:
        if ctx.released is None:
            ctx.released = build_released(
                load_released(ctx.args.released_repo), ctx.model("L", 256, "fp32")
            )
        return ctx.released, ctx.model("L", 256, "fp32")

    def timed(batch: int) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            released, model = setup()
            B = scale.batch[batch]
            labels, orders = make_inputs(
                B, model.num_tokens, model.class_num, device, ctx.args.seed
            )
            fn = released_fn(
                released, labels, orders, group_sizes(scale.img[256], 20), SAMPLING.cfg
            )

            def call() -> torch.Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "autocast"):
                    return fn()

            row = timing(call, device, scale, batch)
            return [{**row, "img_s": B / (row["ms"] / 1e3)}]

        return run

    def greedy() -> list[dict[str, Any]]:
        released, model = setup()
        labels, orders = make_inputs(1, model.num_tokens, model.class_num, device, ctx.args.seed)
        sizes = group_sizes(scale.img[256], 20)
        with exact_fp32():
            ours = sample_tokens(model, labels, orders, sizes, SAMPLING, greedy=True)
            theirs = released_fn(released, labels, orders, sizes, SAMPLING.cfg, greedy=True)()
        return [same_tokens_row([ours], [theirs], strict=False)]

    fields = dict(model="L", img=256, steps=20, mode="released")
    amp = (
        "autocast" if device.type == "cuda" else "fp32"
    )  # as its evaluation loop; its caches follow autocast on CUDA only
    return [
        Item(
            "released",
            "L-256 20 steps b1",
            {**fields, "batch": 1, "dtype": amp},
            timed(1),
            lambda: 2 * scale.seconds[1] + 3 * scale.setup_s,
        ),
        Item(
            "released",
            "L-256 20 steps b64",
            {**fields, "batch": 64, "dtype": amp},
            timed(64),
            lambda: 2 * scale.seconds[64] + scale.setup_s,
        ),
        Item(
            "released",
            "L-256 20 steps b1: greedy vs ours",
            {**fields, "batch": 1, "dtype": "fp32"},
            greedy,
            lambda: 2 * scale.setup_s,
        ),
    ]


PLANS = {
    "parity": parity_items,
    "decode": decode_items,
    "train": train_items,
    "released": released_items,
}


# ---------------------------------------------------------------------------------------------
# Running, recording, reporting
# ---------------------------------------------------------------------------------------------


def best(
    rows: list[dict[str, Any]], key: str, lowest: bool = True, **match: Any
) -> dict[str, Any] | None:
    found = [
        r
        for r in rows
        if r["status"] == "ok" and key in r and all(r.get(k) == v for k, v in match.items())
    ]
    return (min if lowest else max)(found, key=lambda r: r[key]) if found else None


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, from the best mode of each case (measured on an H100/H200)."""
    dec = dict(section="decode", model="L", img=256, dtype="bf16")
    lat = best(rows, "ms", **dec, steps=20, batch=1, vq=False)
    lat_vq = best(rows, "ms", **dec, steps=20, batch=1, vq=True)
    thr = best(rows, "img_s", False, **dec, steps=20, batch=64, vq=False)
    raster = best(rows, "ms", **dec, steps=256, batch=1, vq=False)
    sdpa = best(rows, "ms", section="train", attn="sdpa", checkpointing=False)
    flex = best(rows, "ms", section="train", attn="flex", checkpointing=False)

    def goal(
        text: str, target: str, value: float | None, met: bool | None, where: str = ""
    ) -> dict[str, Any]:
        return {"goal": text, "target": target, "measured": value, "met": met, "how": where}

    out = [
        goal(
            "LPD-L-256 20 steps b1 bf16, tokens",
            "<= 40 ms",
            lat and lat["ms"],
            lat and lat["ms"] <= 40,
            lat and lat["mode"],
        ),
        goal(
            "... with VQ decoding",
            "<= 50 ms",
            lat_vq and lat_vq["ms"],
            lat_vq and lat_vq["ms"] <= 50,
            lat_vq and lat_vq["mode"],
        ),
        goal(
            "LPD-L-256 20 steps b64, images/s",
            ">= 400",
            thr and thr["img_s"],
            thr and thr["img_s"] >= 400,
            thr and thr["mode"],
        ),
    ]
    ratio = raster["ms"] / lat["ms"] if raster and lat else None
    out.append(
        goal(
            "256 steps / 20 steps latency, b1",
            "<= 8x",
            ratio,
            ratio and ratio <= 8,
            ratio and f"{raster['mode']} / {lat['mode']}",
        )
    )
    speed = sdpa["ms"] / flex["ms"] if sdpa and flex else None
    dloss = abs(sdpa["eval_loss"] - flex["eval_loss"]) if sdpa and flex else None
    out.append(
        goal(
            "training step flex / dense-mask SDPA, L-256 b64 bf16",
            ">= 1.3x, same loss",
            speed,
            speed and speed >= 1.3 and dloss <= 1e-2,
            dloss is not None and f"|d eval loss| {dloss:.1e}",
        )
    )
    for b in (1, 64):
        rel = best(rows, "ms", section="released", batch=b, steps=20)
        ours = best(rows, "ms", **dec, steps=20, batch=b, vq=False)
        if rel and ours:
            out.append(
                goal(
                    f"speed-up over the released sampler, b{b}",
                    "(reported)",
                    rel["ms"] / ours["ms"],
                    None,
                    ours["mode"],
                )
            )
    return [{**g, "met": None if g["met"] is None else bool(g["met"])} for g in out]


COLUMNS = (
    "section",
    "case",
    "mode",
    "dtype",
    "ms",
    "img/s",
    "1st s",
    "runs",
    "peak GB",
    "check / note",
)


def cells(r: dict[str, Any]) -> list[str]:
    num = lambda k, f: "-" if r.get(k) is None else format(r[k], f)  # noqa: E731
    case = r["case"] + (" +vq" if r.get("vq") else "")
    note = {"ok": "", "fail": "FAIL ", "error": "ERROR ", "skipped": "skipped "}[r["status"]]
    note += "; ".join(x for x in (r.get("check"), r.get("note"), r.get("error")) if x)
    return [
        r["section"],
        case,
        r.get("mode", "-"),
        r.get("dtype", "-"),
        num("ms", ".2f"),
        num("img_s", ".1f"),
        num("first_s", ".1f"),
        num("runs", "d"),
        num("peak_gb", ".2f"),
        note,
    ]


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    body = [cells(r) for r in rows]
    if markdown:
        fmt = lambda c: "| " + " | ".join(x.replace("|", "/") for x in c) + " |"  # noqa: E731
        return "\n".join([fmt(COLUMNS), "|" + "---|" * len(COLUMNS)] + [fmt(c) for c in body])
    widths = [max(len(c[i]) for c in [list(COLUMNS)] + body) for i in range(len(COLUMNS) - 1)]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(c, widths)) + "  " + c[-1]
        for c in [list(COLUMNS)] + body
    )


def goals_text(gs: list[dict[str, Any]]) -> str:
    lines = []
    for g in gs:
        v = "not measured" if g["measured"] is None else f"{g['measured']:.3g}"
        met = {True: "met", False: "NOT met", None: ""}[g["met"]]
        lines.append(
            f"  {g['goal']}: {v} (target {g['target']}) {met}"
            + (f" [{g['how']}]" if g["how"] else "")
        )
    return "\n".join(lines)


def draw(rows: list[dict[str, Any]], path: str) -> None:
    from lpd.plotting import line_chart

    ok = [r for r in rows if r["status"] == "ok"]
    dec = [
        r
        for r in ok
        if r["section"] == "decode"
        and r.get("dtype") == "bf16"
        and not r.get("vq")
        and r.get("model") != "VQ-16"
    ]

    def series(
        rs: list[dict[str, Any]], x: Callable[[dict], float], y: str, name: Callable[[dict], str]
    ) -> dict[str, list]:
        out: dict[str, list] = {}
        for r in rs:
            out.setdefault(name(r), []).append((x(r), r[y]))
        return {k: sorted(v) for k, v in out.items()}

    mode = lambda r: r["mode"]  # noqa: E731
    at256 = [r for r in dec if r["img"] == 256 and r["steps"] == 20]
    panels = [
        {
            "series": series(
                [r for r in dec if r["model"] == "L" and r["img"] == 256 and r["batch"] == 1],
                lambda r: r["steps"],
                "ms",
                mode,
            ),
            "title": "LPD-L 256 px, batch 1: ms vs steps",
            "xlabel": "steps",
            "ylabel": "ms",
            "log_x": True,
        },
        {
            "series": series(
                [r for r in at256 if r["batch"] == 1], lambda r: r["params_m"], "ms", mode
            ),
            "title": "256 px, 20 steps, batch 1: ms",
            "xlabel": "parameters (M)",
            "ylabel": "ms",
            "log_x": True,
        },
        {
            "series": series(
                [r for r in at256 if r["batch"] == 64], lambda r: r["params_m"], "img_s", mode
            ),
            "title": "256 px, 20 steps, batch 64: images/s",
            "xlabel": "parameters (M)",
            "ylabel": "images / s",
            "log_x": True,
        },
        {
            "series": series(
                [r for r in ok if r["section"] == "train"],
                lambda r: int(r["checkpointing"]),
                "ms",
                lambda r: r["attn"],
            ),
            "title": "LPD-L-256 training step, b64",
            "xlabel": "gradient checkpointing (0 / 1)",
            "ylabel": "ms",
            "log_x": False,
        },
    ]
    line_chart(
        path,
        panels,
        title="gpu_check (bf16 weights; the modes of lpd.sampling)",
        panel_size=(440, 320),
    )


class Recorder:
    """Rows, written to ``OUT/results.json`` and ``OUT/table.md`` after each one."""

    def __init__(self, out: str, meta: dict[str, Any]):
        self.out, self.meta, self.rows = out, meta, []
        self.sections: dict[str, dict[str, Any]] = {}

    def add(self, item: Item, index: int, status: str, **fields: Any) -> dict[str, Any]:
        row = {
            "section": item.section,
            "item": index,
            "case": item.case,
            **item.fields,
            "status": status,
            **fields,
        }
        self.rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        self.write()
        return row

    def write(self, complete: bool = False) -> None:
        data = {
            **self.meta,
            "complete": complete,
            "sections": self.sections,
            "rows": self.rows,
            "goals": goals(self.rows),
        }
        text = json.dumps(data, indent=1, default=str).encode()
        atomic_write_bytes(
            os.path.join(self.out, "results.json"), lambda f: f.write(text), fsync=False
        )
        md = (
            f"{describe_host(self.meta['host'])}\n\n{table(self.rows, markdown=True)}\n\nGoals:\n\n"
            + goals_text(data["goals"]).replace("  ", "- ", 1).replace("\n  ", "\n- ")
            + "\n"
        ).encode()
        atomic_write_bytes(os.path.join(self.out, "table.md"), lambda f: f.write(md), fsync=False)


def run_section(
    rec: Recorder, name: str, items: list[Item], end: float, device: torch.device
) -> None:
    """Every item gives at least one row: its measurements, its error, or why it was skipped."""
    t0 = time.monotonic()
    rec.sections[name] = {"seconds_given": round(end - t0, 1), "planned": len(items)}
    stopped = ""
    for i, it in enumerate(items):
        done = len(rec.rows)
        try:
            left = end - time.monotonic()
            if stopped or left < it.est_s():
                rec.add(
                    it,
                    i,
                    "skipped",
                    error=stopped
                    or f"needs ~{it.est_s():.0f} s, {max(left, 0):.0f} s left in this section",
                )
                continue
            t_row = time.monotonic()
            try:
                with alarm(end):
                    rows = it.run()
            except Exception as e:  # noqa: BLE001 - every failure becomes a row
                text = str(e).strip()
                rec.add(
                    it,
                    i,
                    "error",
                    error=f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}",
                    traceback=traceback.format_exc(limit=-6),
                )
                continue
            for r in rows:
                rec.add(it, i, r.pop("status", "ok"), **r, row_s=round(time.monotonic() - t_row, 2))
        except Deadline as e:  # the section's alarm, or SIGTERM from the outer limit
            stopped = (
                str(e)
                if str(e) == TERMINATED
                else f"stopped: the {name} section's {end - t0:.0f} s were used up"
            )
            if len(rec.rows) == done:
                rec.add(it, i, "error", error=stopped)
        finally:
            if device.type == "cuda":  # free the row's graphs and caches before the next row
                with contextlib.suppress(Exception):
                    sync(device)
                    gc.collect()
                    torch.cuda.empty_cache()
    rec.sections[name]["seconds_used"] = round(time.monotonic() - t0, 1)
    if stopped == TERMINATED:
        raise Deadline(stopped)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        required=True,
        help="new (or empty) folder for results.json, table.md, gpu_check.png",
    )
    p.add_argument(
        "--dry_run", action="store_true", help="tiny shapes on the CPU (or --device), in seconds"
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda; cpu with --dry_run)"
    )
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help=f"seconds for all sections (default {FULL.budget_s:g}; dry run {DRY.budget_s:g})",
    )
    p.add_argument(
        "--sections",
        default=None,
        help=f"comma list of {', '.join(SECTIONS)} (default: all; released with --released_repo)",
    )
    p.add_argument(
        "--released_repo",
        default=None,
        help="released LPD checkout to time in the same run (section 'released')",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sections = (
        SECTIONS
        if args.sections is None
        else [s.strip() for s in args.sections.split(",") if s.strip()]
    )
    if not sections or set(sections) - set(SECTIONS):
        p.error(f"--sections must be a comma list of {', '.join(SECTIONS)}, got {args.sections!r}")
    if args.sections is not None and "released" in sections and not args.released_repo:
        p.error(
            "--sections released needs --released_repo DIR (a checkout of the released LPD code)"
        )
    args.sections = [
        s for s in SECTIONS if s in sections and (s != "released" or args.released_repo)
    ]
    if args.budget_s is not None and not (args.budget_s > 0 and math.isfinite(args.budget_s)):
        p.error(f"--budget_s must be a positive number of seconds, got {args.budget_s}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        p.error(
            f"--out {args.out} exists and is not an empty folder; give a new folder (results are never overwritten)"
        )
    if args.released_repo and not os.path.isfile(
        os.path.join(args.released_repo, "models", "lpd.py")
    ):
        p.error(
            f"--released_repo {args.released_repo} has no models/lpd.py; pass a checkout of the released LPD code"
        )
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; --dry_run checks the script on the CPU with tiny shapes")
    if device.type != "cuda" and not args.dry_run:
        p.error(
            f"the full shapes need a CUDA device, not {args.device}; use --dry_run to check the script here"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.monotonic()
    scale = DRY if args.dry_run else FULL
    if args.dry_run and args.device.startswith(
        "cuda"
    ):  # a quick first check on a GPU: tiny shapes, the real compiler
        scale = replace(DRY, compile=FULL.compile, compile_s=20.0)
    budget = args.budget_s or scale.budget_s
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(
            1
        )  # tiny shapes: more threads only wait for each other on a shared CPU
    signal.signal(signal.SIGALRM, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    os.makedirs(args.out, exist_ok=True)
    info = host_info(device)
    info["cuda"] = torch.version.cuda
    print(
        describe_host(info)
        + (" -- DRY RUN: tiny shapes, times mean nothing" if args.dry_run else ""),
        flush=True,
    )
    meta = {
        "dry_run": args.dry_run,
        "host": info,
        "args": vars(args),
        "budget_s": budget,
        "sampling": SAMPLING.to_dict(),
        "scale": {k: v for k, v in vars(scale).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rec = Recorder(args.out, meta)
    ctx = Context(args, scale, device)
    total = sum(SHARES[s] for s in args.sections)
    end, reserve = start, min(10.0, 0.05 * budget)
    print("  ".join(COLUMNS), flush=True)
    terminated = False
    try:
        for name in args.sections:
            end += (budget - reserve) * SHARES[name] / total
            run_section(rec, name, PLANS[name](ctx), end, device)
            ctx.drop_models()
            fresh_compile()
    except Deadline as e:
        terminated = True
        print(f"stopped: {e}", flush=True)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(
        signal.SIGTERM, signal.SIG_DFL
    )  # from here on a TERM just ends the process; every write is atomic
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    rec.write(complete=True)
    written = [os.path.join(args.out, f) for f in ("results.json", "table.md")]
    try:
        draw(rec.rows, os.path.join(args.out, "gpu_check.png"))
        written.append(os.path.join(args.out, "gpu_check.png"))
    except Exception as e:  # noqa: BLE001 - the numbers are written; a chart failure is reported, not fatal
        print(f"chart not drawn: {type(e).__name__}: {e}", flush=True)
    print(
        "\n"
        + table(rec.rows)
        + "\n\ngoals"
        + (" (dry run: tiny shapes, not meaningful)" if args.dry_run else "")
        + ":\n"
        + goals_text(goals(rec.rows))
    )
    counts = {
        s: sum(r["status"] == s for r in rec.rows) for s in ("ok", "fail", "error", "skipped")
    }
    print(
        f"\n{len(rec.rows)} rows: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f"; {meta['elapsed_s']} s; wrote "
        + ", ".join(written)
    )
    return 128 + signal.SIGTERM if terminated else 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
