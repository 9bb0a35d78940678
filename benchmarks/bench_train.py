"""Training-step speed of :class:`lpd.models.LPD`: tokens/s of forward + backward + AdamW step.

One step = random orders for the batch, the training pass with label dropout and dropout
(train mode), the mean cross-entropy over all ``N`` tokens, backward, gradient clipping at 3.0
and an AdamW step (betas 0.9/0.95, weight decay 0.02 on the released parameter groups), as in the
released recipe.  Group sizes cycle through the resolution's training schedules
(``lpd.schedules.training_schedules``; ``--schedule 20`` fixes one).  Configurations: model x
batch x dtype (bf16 = autocast) x attention kernel (``sdpa`` / ``flex`` / ``auto``) x optimizer
(``adamw``: torch's default implementation; ``fused``: ``AdamW(fused=True)``) x ``torch.compile``.
Prints a table; ``--output_json`` writes JSON and a chart (tokens/s vs batch) next to it.

    python benchmarks/bench_train.py                                   # tiny model, batch 8, eager variants
    python benchmarks/bench_train.py --released_repo /tmp/lpd_released # + the released step, same run

With ``--released_repo`` every configuration in fp32 is also timed against the released training
step with the same weights (interleaved; CPU time on a CPU) and both losses are compared on the
same tokens, labels, orders and schedule in eval mode (no dropout), where they must agree.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    MODELS,
    PeakMemory,
    build_model,
    build_released,
    describe_host,
    host_info,
    interleaved_times,
    load_released,
    pair_ratio,
    parse_list,
    parse_switch,
    ratio_timer,
    summarize,
)

from lpd.schedules import group_sizes, training_schedules  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class Stepper:
    """Cycles through schedules; every call of :meth:`step` is one full optimisation step."""

    def __init__(self, schedules: list[list[int]]):
        self.schedules = schedules
        self.i = 0

    def next_schedule(self) -> list[int]:
        sizes = self.schedules[self.i % len(self.schedules)]
        self.i += 1
        return sizes


def make_optimizer(params: Any, kind: str) -> torch.optim.Optimizer:
    """AdamW as in the released recipe; ``fused`` uses torch's single-kernel implementation."""
    kwargs: dict[str, Any] = dict(lr=1e-4, betas=(0.9, 0.95))
    if kind == "fused":
        kwargs["fused"] = True
    elif kind != "adamw":
        raise ValueError(f"optimizer must be 'adamw' or 'fused', got {kind!r}")
    return torch.optim.AdamW(params, **kwargs)


def ours_step(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    schedules: list[list[int]],
    dtype: str,
    optimizer: str,
    compiled: bool,
) -> Callable[[], float]:
    """A closure running one training step of our model."""
    device = tokens.device
    B, N = tokens.shape
    opt = make_optimizer(model.param_groups(0.02), optimizer)
    fwd = torch.compile(model) if compiled else model
    cycle = Stepper(schedules)
    amp = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        sizes = cycle.next_schedule()
        orders = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)]).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = fwd(tokens, labels, orders, sizes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def released_step(
    released: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    schedules: list[list[int]],
) -> Callable[[], float]:
    """One training step of the released model as its training loop runs it (fp32 here)."""
    decay, no_decay = [], []
    for name, p in released.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    opt = make_optimizer(
        [{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}],
        "adamw",
    )
    cycle = Stepper(schedules)

    def step() -> float:
        loss = released(tokens, labels, cycle.next_schedule())  # samples its orders inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(released.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def same_loss(
    model: torch.nn.Module,
    released: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    schedules: list[list[int]],
    seed: int = 0,
) -> float:
    """Largest |loss difference| over a few schedules, both in eval mode on identical orders
    (the released model draws its orders with ``np.random.shuffle``; the same draws are replayed)."""
    B, N = tokens.shape
    worst = 0.0
    model.eval()
    released.eval()
    for i, sizes in enumerate(schedules[:3]):
        np.random.seed(seed + i)
        ref = released(tokens, labels, sizes).item()
        np.random.seed(seed + i)
        rows = []
        for _ in range(B):
            o = np.array(list(range(N)))
            np.random.shuffle(o)
            rows.append(o)
        orders = torch.as_tensor(np.array(rows), device=tokens.device).long()
        ours = model(tokens, labels, orders, sizes).item()
        worst = max(worst, abs(ref - ours))
    model.train()
    released.train()
    return worst


HEADER = f"{'model':>5} {'batch':>5} {'dtype':>5} {'attn':>5} {'optim':>6} {'comp':>4} | {'step s':>8} {'cpu s':>8} {'tok/s':>9} {'mem MB':>8} {'vs rel.':>7} {'|dloss|':>8}"


def print_row(r: dict[str, Any]) -> None:
    mem, rel, dl = (
        r.get("peak_mem_mb"),
        r.get("speedup_vs_released"),
        r.get("loss_diff_vs_released"),
    )
    print(
        f"{r['model']:>5} {r['batch']:>5} {r['dtype']:>5} {r['attn']:>5} {r['optimizer']:>6} {'on' if r['compile'] else 'off':>4} | "
        f"{r['wall_median_s']:8.3f} {r['cpu_median_s']:8.3f} {r['tokens_per_s']:9.0f} {'-' if mem is None else f'{mem:.0f}':>8} "
        f"{'-' if rel is None else f'{rel:.2f}x':>7} {'-' if dl is None else f'{dl:.1e}':>8}",
        flush=True,
    )


def run(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    released_mod = load_released(args.released_repo) if args.released_repo else None
    schedules = (
        training_schedules(args.img_size)
        if args.schedule == "all"
        else [group_sizes(args.img_size, int(args.schedule))]
    )
    key = ratio_timer(device)
    records = []
    for name in parse_list(args.models):
        for batch in parse_list(args.batch, int):
            g = torch.Generator().manual_seed(args.seed)
            base = build_model(name, args.img_size, device, seed=args.seed)
            N = base.num_tokens
            tokens = torch.randint(0, base.vocab_size, (batch, N), generator=g).to(device)
            labels = torch.randint(0, base.class_num, (batch,), generator=g).to(device)
            state = {k: v.clone() for k, v in base.state_dict().items()}
            for dtype, attn, optim, comp in itertools.product(
                parse_list(args.dtype),
                parse_list(args.attn),
                parse_list(args.optimizer),
                parse_switch(args.compile),
            ):
                model = base
                model.load_state_dict(state)
                model.set_attn_impl(attn)
                model.train()
                fns = {"ours": ours_step(model, tokens, labels, schedules, dtype, optim, comp)}
                rec: dict[str, Any] = dict(
                    model=name,
                    batch=batch,
                    dtype=dtype,
                    attn=attn,
                    optimizer=optim,
                    compile=comp,
                    flex=model.uses_flex(device),
                )
                released = None
                if released_mod is not None and dtype == "fp32":
                    released = build_released(released_mod, base).train()
                    rec["loss_diff_vs_released"] = same_loss(
                        model, released, tokens, labels, schedules
                    )
                    fns["released"] = released_step(released, tokens, labels, schedules)
                t = interleaved_times(fns, device, reps=args.reps, warmup=args.warmup)
                rec.update(summarize(t["ours"]))
                rec["times"] = t["ours"]
                rec["tokens_per_s"] = batch * N / rec["wall_median_s"]
                if released is not None:
                    rec["released"] = summarize(t["released"]) | {"times": t["released"]}
                    rec["speedup_vs_released"] = pair_ratio(t["released"], t["ours"], key)
                    rec["speedup_timer"] = key
                if not args.no_memory:
                    with PeakMemory(device) as pm:
                        fns["ours"]()
                    rec["peak_mem_mb"] = None if pm.peak_bytes is None else pm.peak_bytes / 2**20
                records.append(rec)
                print_row(rec)
                del fns, released
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--models", default="tiny", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--batch", default="8", help="comma list of batch sizes")
    p.add_argument(
        "--schedule",
        default="all",
        help="'all' (cycle through the training schedules) or a step count",
    )
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 (autocast) or both")
    p.add_argument(
        "--attn",
        default="auto",
        help="comma list of sdpa, flex, auto (flex: CUDA; CPU runs its slow reference)",
    )
    p.add_argument(
        "--optimizer",
        default="adamw,fused",
        help="adamw (torch default), fused (AdamW(fused=True)) or both",
    )
    p.add_argument(
        "--compile",
        default="off",
        help="off, on or off,on (torch.compile of the model; minutes on a CPU)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=9,
        help="timed steps per configuration (interleaved with the released step)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory step")
    p.add_argument(
        "--released_repo",
        default=None,
        help="released LPD checkout (CPU: prepared copy) to time in the same run",
    )
    p.add_argument(
        "--output_json", default=None, help="write the numbers here (+ a PNG chart next to it)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = host_info(device)
    print(describe_host(info))
    if device.type == "cpu":
        print(
            "CPU run: absolute times say little about GPUs; compare ratios measured in the same run."
        )
    print(HEADER)
    records = run(args, device)
    result = {"host": info, "args": vars(args), "records": records}
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        from lpd.plotting import line_chart

        series: dict[str, list[tuple[float, float]]] = {}
        for r in records:
            label = f"{r['model']} {r['dtype']} {r['attn']} {r['optimizer']}" + (
                " compiled" if r["compile"] else ""
            )
            series.setdefault(label, []).append((r["batch"], r["tokens_per_s"]))
            if "released" in r:
                series.setdefault(f"{r['model']} released", []).append(
                    (
                        r["batch"],
                        r["batch"] * (args.img_size // 16) ** 2 / r["released"]["wall_median_s"],
                    )
                )
        png = os.path.splitext(args.output_json)[0] + ".png"
        line_chart(
            png,
            [
                {
                    "series": {k: sorted(set(v)) for k, v in series.items()},
                    "title": "training tokens/s vs batch",
                    "xlabel": "batch",
                    "ylabel": "tokens / s",
                    "log_x": True,
                }
            ],
            panel_size=(640, 400),
        )
        print(f"wrote {args.output_json}, {png}")
    return result


if __name__ == "__main__":
    main()
