"""Sampling speed of :func:`lpd.sampling.sample_tokens`: tokens/s, images/s, latency, peak memory.

Runs a grid of model x batch x steps x CFG x dtype x compile x VQ decoding with random weights
(built directly; no checkpoint needed), prints a table, and with ``--output_json`` writes the
numbers as JSON and two PNG charts next to it (``*_latency.png``: latency vs steps;
``*_throughput.png``: images/s vs batch).  Each configuration is warmed up, then timed
``--reps`` times (synchronised on CUDA); wall time gives the throughput, and the CPU time of this
process is reported too (on a CPU shared with other jobs it is the steadier measure).  Group
sizes are ``lpd.schedules.group_sizes(img_size, steps)``; orders are random permutations.

    python benchmarks/bench_sampling.py                               # quick grid: tiny model (~3 min on 2 cores)
    python benchmarks/bench_sampling.py --models tiny,L --batch 1,16,64 --steps 20,32,256 \\
        --cfg on,off --dtype fp32,bf16 --compile off,on --vq off,on --device cuda --output_json out/sampling.json

``--goals`` runs the comparisons of issue 7 instead (tiny batch 4 CFG 4 20 steps; LPD-L batch 1
fp32 and bf16, 20 steps), against the released implementation in the same run when
``--released_repo PATH`` points to it (see ``benchmarks/reference/README.md``), else against the
figures quoted in the issue.  Ratios are medians over interleaved pairs of runs: of CPU time
on a one-thread CPU run (steady under other jobs' load), of wall time otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

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
    released_block_causal_mask,
    summarize,
    time_call,
)

from lpd.sampling import SamplingConfig, sample_tokens  # noqa: E402
from lpd.schedules import group_sizes  # noqa: E402

#: Released-implementation figures quoted in issue 7 (fp32, 2 cores, random weights, CFG on).
QUOTED_RELEASED = {
    ("L", 1, 20): 7.75,  # seconds per image
    ("L", 1, 256): 65.5,
    ("tiny", 4, 20): 0.88,  # seconds per batch of 4
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(
    batch: int, num_tokens: int, class_num: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[B]`` and random orders ``[B, N]`` (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(num_tokens, generator=g) for _ in range(batch)]).to(device)
    labels = (torch.arange(batch) % class_num).to(device)
    return labels, orders


def ours_fn(
    model: torch.nn.Module,
    labels: torch.Tensor,
    orders: torch.Tensor,
    sizes: list[int],
    cfg: float,
    dtype: str,
    compile_step: bool,
    vq: torch.nn.Module | None,
    greedy: bool = False,
) -> Callable[[], torch.Tensor]:
    """One call of our sampler (and the VQ decoder) with fixed inputs."""
    device = orders.device
    amp = DTYPES[dtype]

    def run() -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(0)
        tokens = sample_tokens(
            model,
            labels,
            orders,
            sizes,
            SamplingConfig(cfg=cfg),
            greedy=greedy,
            generator=gen,
            compile=compile_step,
            autocast_dtype=amp,
        )
        if vq is not None:
            G = model.grid_size
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                return vq.decode(tokens.view(-1, G, G))
        return tokens

    return run


def released_fn(
    released: torch.nn.Module,
    labels: torch.Tensor,
    orders: torch.Tensor,
    sizes: list[int],
    cfg: float,
    greedy: bool = False,
) -> Callable[[], torch.Tensor]:
    """One call of the released sampler as its evaluation loop makes it (no_grad, its slot mask);
    greedy = ``top_k=1``, the released code's way to take the argmax."""
    mask = released_block_causal_mask(sizes, orders.device)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return released.sample_tokens(
                orders.shape[0],
                cfg=cfg,
                cfg_schedule="linear",
                labels=labels,
                temperature=1.0,
                attn_mask=mask,
                top_k=1 if greedy else 0,
                top_p=1.0,
                group_sizes=list(sizes),
                orders=orders,
            )

    return run


def measure(
    fn: Callable[[], Any], device: torch.device, reps: int, warmup: int, memory: bool
) -> dict[str, Any]:
    """First-call time (compilation included), then timed repetitions, then peak memory of one call."""
    first_wall, _ = time_call(fn, device)
    times = interleaved_times({"x": fn}, device, reps=reps, warmup=max(0, warmup - 1))["x"]
    out: dict[str, Any] = {"first_call_s": first_wall, **summarize(times), "times": times}
    if memory:
        with PeakMemory(device) as pm:
            fn()
        out["peak_mem_mb"] = None if pm.peak_bytes is None else pm.peak_bytes / 2**20
    return out


def run_grid(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Time every configuration of the grid; returns one record per configuration."""
    released_mod = load_released(args.released_repo) if args.released_repo else None
    vq = None
    if True in parse_switch(args.vq):
        from lpd.tokenizer import build_vq

        torch.manual_seed(0)
        vq = build_vq().to(device).eval()
    records = []
    for name in parse_list(args.models):
        model = build_model(name, args.img_size, device, seed=args.seed)
        released = build_released(released_mod, model) if released_mod is not None else None
        N = model.num_tokens
        grid = itertools.product(
            parse_list(args.batch, int),
            parse_list(args.steps, int),
            parse_switch(args.cfg),
            parse_list(args.dtype),
            parse_switch(args.compile),
            parse_switch(args.vq),
        )
        for batch, steps, use_cfg, dtype, comp, use_vq in grid:
            sizes = group_sizes(args.img_size, steps)
            labels, orders = make_inputs(batch, N, model.class_num, device, seed=args.seed)
            cfg = args.cfg_scale if use_cfg else 1.0
            fn = ours_fn(model, labels, orders, sizes, cfg, dtype, comp, vq if use_vq else None)
            rec: dict[str, Any] = dict(
                model=name, batch=batch, steps=steps, cfg=cfg, dtype=dtype, compile=comp, vq=use_vq
            )
            rec.update(measure(fn, device, args.reps, args.warmup, memory=not args.no_memory))
            lat = rec["wall_median_s"]
            rec["images_per_s"] = batch / lat
            rec["tokens_per_s"] = batch * N / lat
            if released is not None and not comp and not use_vq and dtype == "fp32":
                rfn = released_fn(released, labels, orders, sizes, cfg)
                t = interleaved_times(
                    {"ours": fn, "released": rfn}, device, reps=args.reps, warmup=1
                )
                key = ratio_timer(device)
                rec["released"] = summarize(t["released"])
                rec["speedup_vs_released"] = pair_ratio(t["released"], t["ours"], key)
                rec["speedup_timer"] = key
            records.append(rec)
            print_row(rec)
        del model, released
    return records


HEADER = f"{'model':>5} {'batch':>5} {'steps':>5} {'cfg':>4} {'dtype':>5} {'comp':>4} {'vq':>3} | {'latency s':>9} {'cpu s':>8} {'img/s':>8} {'tok/s':>9} {'mem MB':>8} {'1st s':>7} {'vs rel.':>7}"


def print_row(r: dict[str, Any]) -> None:
    mem = r.get("peak_mem_mb")
    rel = r.get("speedup_vs_released")
    print(
        f"{r['model']:>5} {r['batch']:>5} {r['steps']:>5} {r['cfg']:>4g} {r['dtype']:>5} {'on' if r['compile'] else 'off':>4} "
        f"{'on' if r['vq'] else 'off':>3} | {r['wall_median_s']:9.3f} {r['cpu_median_s']:8.3f} {r['images_per_s']:8.2f} "
        f"{r['tokens_per_s']:9.0f} {'-' if mem is None else f'{mem:.0f}':>8} {r['first_call_s']:7.2f} "
        f"{'-' if rel is None else f'{rel:.2f}x':>7}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# The goals of issue 7
# ---------------------------------------------------------------------------------------------


def run_goals(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The issue's comparisons: ours vs the released sampler (same weights, same run) or the quoted figures."""
    released_mod = load_released(args.released_repo) if args.released_repo else None
    key = ratio_timer(device)
    out = []
    cases = [("tiny", 4, 20, args.reps_tiny), ("L", 1, 20, args.reps_large)]
    if args.goals_long:
        cases.append(("L", 1, 256, 1))
    built: dict[str, Any] = {}
    for name, batch, steps, reps in cases:
        if name not in built:
            built.clear()
            model = build_model(name, args.img_size, device, seed=args.seed)
            built[name] = (
                model,
                build_released(released_mod, model) if released_mod is not None else None,
            )
        model, released = built[name]
        sizes = group_sizes(args.img_size, steps)
        labels, orders = make_inputs(
            batch, model.num_tokens, model.class_num, device, seed=args.seed
        )
        cfg = args.cfg_scale
        fns = {"ours_fp32": ours_fn(model, labels, orders, sizes, cfg, "fp32", False, None)}
        if name == "L" and steps == 20:
            fns["ours_bf16"] = ours_fn(model, labels, orders, sizes, cfg, "bf16", False, None)
        if released is not None:
            fns["released_fp32"] = released_fn(released, labels, orders, sizes, cfg)
        print(
            f"goal case: {name} batch {batch} CFG {cfg} {steps} steps, {reps} interleaved reps ...",
            flush=True,
        )
        t = interleaved_times(fns, device, reps=reps, warmup=1)
        rec: dict[str, Any] = dict(
            model=name,
            batch=batch,
            steps=steps,
            cfg=cfg,
            timer=key,
            reps=reps,
            times={k: summarize(v) | {"raw": v} for k, v in t.items()},
        )
        # Greedy tokens: ours vs released (fp32), ours bf16 vs ours fp32.
        greedy = ours_fn(model, labels, orders, sizes, cfg, "fp32", False, None, greedy=True)()
        if released is not None:
            rel_tokens = released_fn(released, labels, orders, sizes, cfg, greedy=True)()
            rec["greedy_identical_to_released"] = bool(torch.equal(greedy, rel_tokens))
            rec["greedy_agreement_with_released"] = (greedy == rel_tokens).float().mean().item()
            rec["speedup_fp32"] = pair_ratio(t["released_fp32"], t["ours_fp32"], key)
            if "ours_bf16" in t:
                rec["speedup_bf16_vs_released_fp32"] = pair_ratio(
                    t["released_fp32"], t["ours_bf16"], key
                )
        quoted = QUOTED_RELEASED.get((name, batch, steps))
        if quoted is not None:
            rec["quoted_released_wall_s"] = quoted
            rec["speedup_fp32_vs_quoted_wall"] = quoted / rec["times"]["ours_fp32"]["wall_median_s"]
        if "ours_bf16" in t:
            g16 = ours_fn(model, labels, orders, sizes, cfg, "bf16", False, None, greedy=True)()
            rec["bf16_greedy_agreement_with_fp32"] = (g16 == greedy).float().mean().item()
            rec["bf16_speedup_vs_ours_fp32"] = pair_ratio(t["ours_fp32"], t["ours_bf16"], key)
        out.append(rec)
        print_goal(rec)
    return out


def print_goal(r: dict[str, Any]) -> None:
    k = r["timer"]
    parts = [
        f"  {name}: wall {v['wall_median_s']:.3f} s, cpu {v['cpu_median_s']:.3f} s (median)"
        for name, v in r["times"].items()
    ]
    print("\n".join(parts))
    for field in (
        "speedup_fp32",
        "speedup_bf16_vs_released_fp32",
        "bf16_speedup_vs_ours_fp32",
        "speedup_fp32_vs_quoted_wall",
    ):
        if field in r:
            print(
                f"  {field}: {r[field]:.3f}x"
                + (
                    f" ({k} time, interleaved pairs)"
                    if "quoted" not in field
                    else " (our wall time vs the issue's figure; not the same run)"
                )
            )
    for field in (
        "greedy_identical_to_released",
        "greedy_agreement_with_released",
        "bf16_greedy_agreement_with_fp32",
    ):
        if field in r:
            print(f"  {field}: {r[field]}")
    sys.stdout.flush()


def draw_charts(records: list[dict[str, Any]], stem: str) -> list[str]:
    """``stem_latency.png`` (latency vs steps) and ``stem_throughput.png`` (images/s vs batch)."""
    from lpd.plotting import line_chart

    fields = ("batch", "steps", "cfg", "dtype", "compile", "vq")
    varying = {f for f in fields if len({r[f] for r in records}) > 1}

    def label(r: dict[str, Any], *skip: str) -> str:
        """Series name from the model and the settings that vary in this run."""
        parts = [r["model"]]
        short = {
            "batch": f"b{r['batch']}",
            "steps": f"s{r['steps']}",
            "cfg": "cfg" if r["cfg"] != 1.0 else "no-cfg",
            "dtype": r["dtype"],
            "compile": "compiled" if r["compile"] else "eager",
            "vq": "+vq" if r["vq"] else "tokens",
        }
        parts += [short[f] for f in fields if f in varying and f not in skip]
        return " ".join(parts)

    lat: dict[str, list[tuple[float, float]]] = {}
    thr: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        lat.setdefault(label(r, "steps"), []).append((r["steps"], r["wall_median_s"]))
        thr.setdefault(label(r, "batch"), []).append((r["batch"], r["images_per_s"]))
        if "released" in r:
            rel = r["released"]["wall_median_s"]
            lat.setdefault(label(r, "steps") + " (released)", []).append((r["steps"], rel))
            thr.setdefault(label(r, "batch") + " (released)", []).append(
                (r["batch"], r["batch"] / rel)
            )
    paths = [f"{stem}_latency.png", f"{stem}_throughput.png"]
    line_chart(
        paths[0],
        [
            {
                "series": {k: sorted(v) for k, v in lat.items()},
                "title": "latency per batch vs steps",
                "xlabel": "steps",
                "ylabel": "seconds",
                "log_x": True,
            }
        ],
        panel_size=(900, 420),
    )
    line_chart(
        paths[1],
        [
            {
                "series": {k: sorted(v) for k, v in thr.items()},
                "title": "throughput vs batch",
                "xlabel": "batch",
                "ylabel": "images / s",
                "log_x": True,
            }
        ],
        panel_size=(900, 420),
    )
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--models", default="tiny", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--batch", default="1,16", help="comma list of batch sizes")
    p.add_argument("--steps", default="20,32,256", help="comma list of step counts")
    p.add_argument("--cfg", default="on", help="on, off or on,off (CFG as a doubled batch)")
    p.add_argument("--cfg_scale", type=float, default=4.0)
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 (autocast) or both")
    p.add_argument(
        "--compile",
        default="off",
        help="off, on or off,on (torch.compile of the static-shape step)",
    )
    p.add_argument(
        "--vq", default="off", help="off, on or off,on (decode the tokens with a random VQ-16)"
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per configuration")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed calls first (the first one compiles)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory run")
    p.add_argument(
        "--released_repo",
        default=None,
        help="released LPD checkout (CPU: prepared copy) to time in the same run",
    )
    p.add_argument(
        "--goals", action="store_true", help="run the issue-7 comparisons instead of the grid"
    )
    p.add_argument(
        "--goals_long",
        action="store_true",
        help="with --goals: also LPD-L at 256 steps (minutes on a CPU)",
    )
    p.add_argument(
        "--reps_tiny", type=int, default=7, help="with --goals: repetitions of the tiny case"
    )
    p.add_argument(
        "--reps_large", type=int, default=3, help="with --goals: repetitions of the LPD-L cases"
    )
    p.add_argument(
        "--output_json", default=None, help="write the numbers here (+ PNG charts next to it)"
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
    result: dict[str, Any] = {"host": info, "args": vars(args)}
    if args.goals:
        result["goals"] = run_goals(args, device)
    else:
        print(HEADER)
        result["records"] = run_grid(args, device)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        written = [args.output_json]
        if result.get("records"):
            written += draw_charts(result["records"], os.path.splitext(args.output_json)[0])
        print("wrote " + ", ".join(written))
    return result


if __name__ == "__main__":
    main()
