"""What the demos share: their training runs (one process, reused by a rerun) and the exit status."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from lpd.files import atomic_write_bytes, load_checkpoint
from lpd.models import load_lpd

#: TrainConfig fields of the demos' training runs: one process, no checkpoints but the last
DEMO_RUN = dict(num_workers=0, pin_mem=False, save_every_steps=0, save_every_epochs=0, eval_freq=0)


class DemoInterrupted(RuntimeError):
    """Training stopped on a signal after saving; rerunning the demo resumes it."""


def reuse_run(config: Any, signature: dict[str, Any], device: torch.device, log) -> Any:
    """The model of a finished run of ``signature`` in ``config.output_dir``, else None (an
    interrupted one: ``config.resume`` set); a run of other settings is refused."""
    out, signature = config.output_dir, json.loads(json.dumps(signature))
    last, sig_path = (os.path.join(out, n) for n in ("checkpoint-last.pth", "demo_signature.json"))
    if os.path.isfile(last):
        saved = None
        if os.path.isfile(sig_path):
            with open(sig_path, encoding="utf-8") as f:
                saved = json.load(f)
        if saved != signature:
            raise ValueError(
                f"{out} holds a training run of other settings; use another --output_dir "
                f"or delete {out} to train again"
            )
        ckpt = load_checkpoint(last)
        if ckpt["epoch"] + 1 >= config.epochs and ckpt["step"] >= ckpt["steps_per_epoch"]:
            log(f"reusing the trained model in {out}")
            return load_lpd(last).to(device).eval()
        log(f"resuming the interrupted training run in {out}")
        config.resume = out
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(sig_path, lambda f: f.write(json.dumps(signature).encode()))
    return None


def run_main(run: Any) -> int:
    """Exit status of ``run()``: 0, 75 (interrupted, a rerun resumes) or 2 (one ``error:`` line)."""
    try:
        run()
    except DemoInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 75
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
