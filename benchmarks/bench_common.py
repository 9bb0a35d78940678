"""Shared pieces of the speed benchmarks (``bench_sampling.py``, ``bench_train.py``).

* models with random weights built directly (``tiny``: width 256, depth 4, 16,384 codes -- the
  issue's tiny config; ``L``, ``XL``, ``XXL``: the released presets);
* timing with warm-up, synchronisation on CUDA, and both wall-clock and process CPU time (on a
  CPU shared with other jobs, the CPU time of a one-thread process is the steadier measure of the
  work done, so ratios use it there; throughput is always reported from wall time);
* peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the peak resident-set growth of this
  process (sampled from ``/proc/self/statm``) on the CPU;
* the released implementation, imported from a local checkout (``--released_repo``) for
  same-run ratios; it is never shipped with this project (see ``benchmarks/reference/``).
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from lpd.models import PRESETS, build_lpd
from lpd.models.lpd import LPD

__all__ = [
    "MODELS",
    "build_model",
    "parse_list",
    "sync",
    "time_call",
    "event_times",
    "interleaved_times",
    "summarize",
    "pair_ratio",
    "ratio_timer",
    "PeakMemory",
    "host_info",
    "load_released",
    "build_released",
    "released_block_causal_mask",
]

#: Benchmark model names -> :func:`lpd.models.build_lpd` keyword arguments (random weights).
MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=256, depth=4, num_heads=4, vocab_size=16384, class_num=1000),
    "L": dict(PRESETS["lpd_l"]),
    "XL": dict(PRESETS["lpd_xl"]),
    "XXL": dict(PRESETS["lpd_xxl"]),
}


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
    """``"1,16,64"`` -> ``[1, 16, 64]`` (with ``kind=int``)."""
    return [kind(t.strip()) for t in text.split(",") if t.strip()]


def parse_switch(text: str) -> list[bool]:
    """``"off,on"`` -> ``[False, True]``."""
    table = {"on": True, "off": False, "1": True, "0": False, "true": True, "false": False}
    out = []
    for t in parse_list(text):
        if t.lower() not in table:
            raise ValueError(f"expected on/off values, got {t!r}")
        out.append(table[t.lower()])
    return out


def build_model(
    name: str,
    img_size: int,
    device: torch.device,
    seed: int = 0,
    models: dict[str, dict[str, Any]] = MODELS,
) -> LPD:
    """A benchmark model ``models[name]`` with random weights that depend only on ``seed`` (and
    the device's generator: it is initialised where it runs), in eval mode."""
    if name not in models:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(models)}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = build_lpd(img_size=img_size, **models[name])
    return model.eval()


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Run ``fn`` once; return (wall seconds, CPU seconds of this process), synchronised on CUDA."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def event_times(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int,
    reps: int,
    max_seconds: float = math.inf,
) -> list[float]:
    """Seconds of each call of ``fn`` after ``warmup`` calls, each call on its own: CUDA events
    on CUDA, ``perf_counter`` elsewhere. Stops after ``reps`` calls or, past the first, ``max_seconds``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    stop = time.perf_counter() + max_seconds
    while len(times) < reps and (not times or time.perf_counter() < stop):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def interleaved_times(
    fns: dict[str, Callable[[], Any]], device: torch.device, reps: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Time several functions in turns (A, B, A, B, ...) so that load changes hit all alike.

    Returns ``{name: {"wall": [...], "cpu": [...]}}`` with ``reps`` entries each.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w, c = time_call(fn, device)
            out[name]["wall"].append(w)
            out[name]["cpu"].append(c)
    return out


def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    """Median and minimum of wall and CPU times."""
    return {
        "wall_median_s": statistics.median(times["wall"]),
        "wall_min_s": min(times["wall"]),
        "cpu_median_s": statistics.median(times["cpu"]),
        "cpu_min_s": min(times["cpu"]),
    }


def ratio_timer(device: torch.device) -> str:
    """Which time ratios use: the process CPU time on a CPU with one torch thread (steady under
    other jobs' load), wall time otherwise (several threads spin or idle; GPUs run asynchronously)."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def pair_ratio(a: dict[str, list[float]], b: dict[str, list[float]], key: str) -> float:
    """Median over repetitions of ``a[i] / b[i]`` (interleaved pairs, so load cancels out)."""
    return statistics.median(x / y for x, y in zip(a[key], b[key]))


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of the code run inside the context.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry.  CPU: the peak
    resident-set size of this process, sampled every ``interval`` seconds by a thread, minus the
    size at entry (an estimate: allocations shorter than the interval can be missed; ``None``
    where ``/proc`` is unavailable).
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            if self._base is not None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            self.peak_bytes = max(self._peak, rss or 0) - self._base


def host_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "cpu" not in info:
                    info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    from lpd.devices import cpu_has_native_bf16

    info["native_bf16"] = (
        cpu_has_native_bf16()
    )  # without it oneDNN emulates bf16 (slower than fp32)
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_host(info: dict[str, Any]) -> str:
    """One line for the printed tables."""
    dev = info.get("gpu") or info.get("cpu", "CPU")
    load = info.get("load_average")
    bf16 = info.get("native_bf16")
    return (
        f"{info['device']}: {dev}; {info['cpu_count']} CPU cores, {info['threads']} torch threads, "
        f"{info['cpu_capability']}"
        + ("" if bf16 is None else f" ({'with' if bf16 else 'without'} native bf16)")
        + f"; torch {info['torch']}"
        + (f"; load average {load}" if load else "")
    )


# ---------------------------------------------------------------------------------------------
# The released implementation (for same-run ratios only; never part of this project)
# ---------------------------------------------------------------------------------------------


@contextmanager
def _on_path(path: str) -> Iterator[None]:
    sys.path.insert(0, path)
    try:
        yield
    finally:
        sys.path.remove(path)


def load_released(repo: str) -> Any:
    """Import the released ``models/lpd.py`` from a local checkout (or a prepared copy).

    The released code imports its own ``models`` package (``models.block``, ``models.mask``,
    ``models.sampling``) and ``timm``.  On a CPU its hard-coded CUDA device must be replaced first:
    ``python benchmarks/reference/prepare_released.py CHECKOUT /tmp/lpd_released``.
    """
    repo = os.path.abspath(repo)
    if not os.path.isfile(os.path.join(repo, "models", "lpd.py")):
        raise FileNotFoundError(
            f"{repo!r} has no models/lpd.py; pass the released LPD checkout or the copy made by "
            f"benchmarks/reference/prepare_released.py"
        )
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        del sys.modules[name]  # a different 'models' package may have been imported before
    with _on_path(repo):
        return importlib.import_module("models.lpd")


def build_released(module: Any, model: LPD) -> torch.nn.Module:
    """The released ``LPD`` with ``model`` 's architecture and weights (state-dict keys are identical)."""
    from functools import partial

    cfg = model.config
    released = module.LPD(
        img_size=cfg.img_size,
        vqgan_stride=cfg.vqgan_stride,
        decoder_embed_dim=cfg.embed_dim,
        decoder_depth=cfg.depth,
        decoder_num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.layernorm_eps),
        label_drop_prob=cfg.label_drop_prob,
        class_num=cfg.class_num,
        attn_dropout=cfg.attn_dropout,
        proj_dropout=cfg.proj_dropout,
        vqgan_vocab_size=cfg.vocab_size,
    )
    released.load_state_dict(model.state_dict(), strict=True)
    return released.to(model.pos_embed.device).eval()


def released_block_causal_mask(group_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """The additive (0 / -inf) slot mask the released evaluation loop passes to its sampler:
    blocks ``[1, g_0, g_1, ...]``, each slot sees every slot up to the end of its own block."""
    sizes = [1, *group_sizes]
    total = sum(sizes)
    mask = torch.full((total, total), float("-inf"), device=device)
    end = 0
    for g in sizes:
        mask[end : end + g, : end + g] = 0.0
        end += g
    return mask
