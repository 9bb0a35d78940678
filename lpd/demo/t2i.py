"""The compositional text-to-image testbed (``python -m lpd.demo --task t2i``): train a small
text-conditional LPD (``lpd.train``) on captioned digit scenes of the seen phrasings and
combinations (``lpd.demo.t2i_data``; captions by the offline ``wordllama`` encoder, half of them
with random words put in: :func:`with_fillers`), sample the seen, held-out-phrasing and
held-out-combination prompts, and score every attribute a caption states with ``T2IJudge``
(accuracy with a 95% bootstrap interval).

Writes ``OUTPUT_DIR/metrics.json``, ``table.md``, ``samples.png`` (with its captions in
``table.md``) and the training run ``train/`` (reused by a rerun of the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lpd.config import HelpFormatter, yaml_mapping
from lpd.demo.common import DEMO_RUN, DemoInterrupted, reuse_run, run_main
from lpd.demo.t2i_data import GROUPS, make_examples, render
from lpd.demo.t2i_judge import ATTRIBUTES, T2IJudge
from lpd.distributed import DistInfo
from lpd.evaluate import image_seed
from lpd.files import atomic_write_bytes
from lpd.images import save_grid
from lpd.orders.source import OrderSource
from lpd.sampling import SamplingConfig, decode_tokens
from lpd.schedules import group_sizes
from lpd.text.encoders import make_text_encoder
from lpd.text.sampling import prompt_tokens
from lpd.tokenizer import PaletteTokenizer
from lpd.train import TrainConfig, train

__all__ = ["build_parser", "run_t2i", "format_table", "with_fillers", "main"]

EVAL_GROUPS = GROUPS[1:]  # seen, heldout_phrasing, heldout_combination
MODEL = dict(embed_dim=64, depth=4, num_heads=4, proj_dropout=0.0)
#: Common English function words, one token each in LLaMA-2's vocabulary (``--function_words``).
FUNCTION_WORDS = tuple("a an the at in on of to and with by for from over under near".split())
FUNCTION_WORDS += tuple("as is it this that or into onto".split())


class CaptionedScenes(torch.utils.data.TensorDataset):
    """``(tokens [256], features [L, 256], mask [L])`` items with the caption cache's ``record``."""

    def __init__(self, tokens, features, mask, record: dict[str, Any]) -> None:
        super().__init__(tokens, features, mask)
        self.record = record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lpd.demo --task t2i",
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--output_dir", default="outputs/demo_t2i")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--model_config", type=yaml_mapping, default=MODEL, help="the architecture")
    for name, kind, default, text in (
        ("train_examples", int, 5600, "captioned training scenes"),
        ("pairs", float, 0.15, "share of two-digit training scenes (evaluation: 1/3)"),
        ("small", float, None, "share of small digits in one-digit training scenes (default 1/4)"),
        ("filler", float, 0.5, "share of training captions with 1-2 random words put in (0: off)"),
        ("function_words", float, 0.0, "share of fillers from 24 function words (a, the, at, ...)"),
        ("epochs", int, 4, "training epochs"),
        ("batch_size", int, 16, "training batch"),
        ("lr", float, 2e-3, "peak learning rate (cosine to 0)"),
        ("max_text_tokens", int, 24, "caption tokens at most"),
        ("seed", int, 0, "seed of the data, training and sampling"),
        ("num_images", int, 300, "prompts sampled per evaluation group"),
        ("steps", int, 16, "decoding steps"),
        ("cfg", float, 5.0, "guidance scale against the null caption"),
        ("temperature", float, 1.0, "sampling temperature"),
        ("classifier_epochs", int, 10, "epochs of the judge's digit classifier"),
        ("resamples", int, 1000, "bootstrap resamples per 95%% interval"),
        ("eval_bsz", int, 100, "prompts per sampling batch"),
        ("grid_images", int, 20, "samples of each evaluation group in samples.png"),
    ):
        p.add_argument(f"--{name}", type=kind, default=default, help=text)
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("train_examples", "epochs", "batch_size", "num_images", "steps", "eval_bsz"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("classifier_epochs", "resamples", "grid_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("pairs", "small", "filler", "function_words"):
        if (v := getattr(args, name)) is not None and not 0 <= v <= 1:
            raise ValueError(f"--{name} must be between 0 and 1, got {v}")
    if args.function_words and not args.filler:
        raise ValueError("--function_words picks among the fillers: give --filler above 0 too")
    if args.max_text_tokens < 2:
        raise ValueError(f"--max_text_tokens must be at least 2, got {args.max_text_tokens}")
    SamplingConfig(cfg=args.cfg, temperature=args.temperature)  # their checks
    group_sizes(256, args.steps)


def _train(args: argparse.Namespace, encoder: Any, device: torch.device, log) -> torch.nn.Module:
    """Train into ``OUTPUT_DIR/train``; a finished run of the same settings is reused, an
    interrupted one resumed."""
    out = os.path.join(args.output_dir, "train")
    arch = {**args.model_config, "condition": "text", "text_dim": encoder.width}
    arch |= {"max_text_tokens": args.max_text_tokens, "vocab_size": 4, "label_drop_prob": 0.1}
    config = TrainConfig(
        model=None,
        img_size=256,
        model_config=arch,
        tokenizer="palette",
        vq_config={"levels": 4},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=0.0,
        lr_schedule="cosine",
        warmup_epochs=0.3,
        seed=args.seed,
        output_dir=out,
        device=str(device),
        log_freq=50,
        **DEMO_RUN,
    )
    signature = {**config.to_dict(), "output_dir": None}
    signature |= {"train_examples": args.train_examples, "pairs": args.pairs}
    signature |= {k: getattr(args, k) for k in ("small", "filler") if getattr(args, k) is not None}
    signature |= {"function_words": args.function_words} if args.function_words else {}
    if (model := reuse_run(config, signature, device, log)) is not None:
        return model
    examples = make_examples(
        args.train_examples,
        "train",
        seed=args.seed,
        pairs=args.pairs,
        small=args.small,
    )
    ids = encoder.token_ids([e.caption for e in examples])[0]
    if args.filler:
        ids = with_fillers(ids, encoder, args.filler, args.seed, args.function_words)
    ids, mask = encoder.pad(ids, args.max_text_tokens)
    record = {"text_encoder": encoder.record, "features": True}
    record["max_text_tokens"] = args.max_text_tokens
    tokens = render([e.scene for e in examples]).flatten(1)
    data = CaptionedScenes(tokens, encoder.encode(ids, mask).cpu(), mask, record)
    result = train(config, info=DistInfo(0, 1, device), dataset=data, log=log)
    if result.preempted:
        raise DemoInterrupted(f"training was interrupted and saved in {out}; rerun to continue")
    return result.model.eval()


def with_fillers(
    ids: list[list[int]], encoder: Any, share: float, seed: int, function_words: float = 0.0
) -> list[list[int]]:
    """``ids`` with one or two random word-start tokens of the encoder's vocabulary (letters
    only; with probability ``function_words`` one of :data:`FUNCTION_WORDS`) put before a word or
    at the end of a seeded ``share`` of the captions."""
    tok = encoder.tokenizer
    starts = {i for t, i in tok.get_vocab().items() if t[:1] == "\u2581"}
    words = sorted(i for i in starts if (t := tok.id_to_token(i)[1:]).isascii() and t.isalpha())
    common = [tok.token_to_id("\u2581" + w) for w in FUNCTION_WORDS] if function_words else []
    if None in common:
        raise ValueError("the encoder's vocabulary lacks a function word as one token")
    rng, out = np.random.default_rng([seed, 7]), []
    for x in ids:
        x = list(x)
        if rng.random() < share:
            for _ in range(rng.integers(1, 3)):
                places = [j for j in range(1, len(x) + 1) if j == len(x) or x[j] in starts]
                pool = common if function_words and rng.random() < function_words else words
                x.insert(places[rng.integers(len(places))], pool[rng.integers(len(pool))])
        out.append(x[: encoder.max_text_tokens])
    return out


def _sample(args, model, encoder, examples, device) -> torch.Tensor:
    """Token grids ``[n, 16, 16]`` of the examples' captions: image ``i`` from ``(seed, i)``."""
    sizes = group_sizes(256, args.steps)
    sampling = SamplingConfig(cfg=args.cfg, temperature=args.temperature, repulsion_threshold=2.0)
    source = OrderSource("lpd", sizes, 16, seed=args.seed, repulsion_threshold=2.0)
    out = []
    for a in range(0, len(examples), args.eval_bsz):
        idx = np.arange(a, min(a + args.eval_bsz, len(examples)))
        gens = [torch.Generator().manual_seed(image_seed(args.seed, int(i))) for i in idx]
        prompts = [examples[i].caption for i in idx]
        rows = source.rows(idx)
        out.append(prompt_tokens(model, encoder, prompts, rows, sizes, sampling, gens).cpu())
    return torch.cat(out).reshape(-1, 16, 16)


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    return f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['n']})"


def format_table(record: dict[str, Any]) -> str:
    """The scores as a Markdown table: a row per group, a column per attribute."""
    lines = [
        "| prompts | " + " | ".join(ATTRIBUTES) + " |",
        "| --- |" + " ---: |" * len(ATTRIBUTES),
    ]
    for name, scores in record["scores"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(scores.get(a)) for a in ATTRIBUTES) + " |")
    return "\n".join(lines)


def run_t2i(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """The whole testbed; returns the record written to ``metrics.json``."""
    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, out, times = torch.device(args.device), args.output_dir, {}
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    encoder = make_text_encoder("wordllama", device, max_text_tokens=args.max_text_tokens)
    log("== 1/3 training the text-conditional model on the seen phrasings and combinations")
    model = _train(args, encoder, device, log)
    times["train"] = time.perf_counter() - t0
    log("== 2/3 training the judge")
    judge = T2IJudge.fit(args.seed, args.classifier_epochs, resamples=args.resamples)
    times["judge"] = time.perf_counter() - t0 - times["train"]
    log(f"== 3/3 sampling {args.num_images} prompts per group ({args.steps} steps, cfg {args.cfg})")
    scores, shown, captions = {}, [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is fastest for small batches on a busy machine
    try:
        for k, group in enumerate(EVAL_GROUPS):
            examples = make_examples(args.num_images, group, seed=args.seed + 1 + k)
            tokens = _sample(args, model, encoder, examples, device)
            scenes = [e.scene for e in examples]
            scores[group] = judge.score(tokens, scenes)
            scores[f"{group} (real scenes)"] = judge.score(render(scenes), scenes)
            shown.append(tokens[: args.grid_images])
            captions += [f"{group}: {e.caption}" for e in examples[: args.grid_images]]
            log(format_table({"scores": {group: scores[group]}}).splitlines()[-1])
    finally:
        torch.set_num_threads(threads)
    times["sample"] = time.perf_counter() - t0 - times["train"] - times["judge"]
    pixels = decode_tokens(
        PaletteTokenizer(4, patch=4), torch.cat(shown).flatten(1), SamplingConfig()
    )
    save_grid(os.path.join(out, "samples.png"), list(pixels), ncol=10, max_tile=64)
    record = {"settings": {k: v for k, v in vars(args).items()}, "scores": scores}
    record["seconds"] = times
    table = format_table(record)
    listing = "\n".join(f"{i}. {c}" for i, c in enumerate(captions))
    text = f"{table}\n\nsamples.png, row by row (10 a row):\n\n{listing}\n"
    atomic_write_bytes(os.path.join(out, "table.md"), lambda f: f.write(text.encode()))
    blob = json.dumps(record, indent=2).encode()
    atomic_write_bytes(os.path.join(out, "metrics.json"), lambda f: f.write(blob))
    log(table)
    log(f"wrote {out}/metrics.json, table.md and samples.png ({sum(times.values()):.0f} s)")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run_t2i(build_parser().parse_args(argv)))
