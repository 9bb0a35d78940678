"""Device and version probes: synchronisation, names for the record, bf16 support of the CPU."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import warnings

import torch


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity: a Slurm task's or container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type != "cpu" and hasattr(torch, device.type):
        getattr(torch, device.type).synchronize()


def device_description(device: torch.device | str) -> str:
    """E.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu (x86_64, 2 threads)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or "unknown"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"{device.type} ({name}{threads})"


def library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries that shape the numbers."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["cuda"] = torch.version.cuda
    for pkg in ("lpd", "numpy", "pillow", "torch-fidelity", "torchvision", "scipy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without, oneDNN emulates it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


_WARNED = False


def warn_if_emulated_bf16(device: torch.device | str, dtype: torch.dtype | None) -> None:
    """Warn once per process when bf16 is asked for on a CPU that can only emulate it."""
    global _WARNED
    bf16_on_cpu = dtype == torch.bfloat16 and torch.device(device).type == "cpu"
    if _WARNED or not bf16_on_cpu or cpu_has_native_bf16():
        return
    _WARNED = True
    warnings.warn(
        "bf16 on this CPU is emulated (no AVX512-BF16 or AMX instructions) and is usually slower "
        "than fp32; leave bf16 off here (it pays on GPUs and on CPUs with AMX)",
        RuntimeWarning,
        stacklevel=3,
    )
