"""FID and Inception Score of generated images, on upstream torch-fidelity's Inception-v3.

The paper's protocol (spec section 6): Inception pool features (2048-d) and unbiased logits
(1008 classes) from torch-fidelity's ``inception-v3-compat`` extractor, one pass for both; FID
against reference statistics (``mu``, ``sigma``; the ADM files ``adm_in256_stats.npz`` /
``adm_in512_stats.npz``), IS over 10 splits exactly as torch-fidelity computes it.

Pieces, each usable alone::

    extractor = inception_extractor(weights_path=None, device=device)   # or any callable, below
    stats = compute_statistics("samples/", extractor, batch_size=50, device=device)
    save_statistics("my_stats.npz", stats.mu, stats.sigma)
    mu, sigma = load_statistics("adm_in256_stats.npz")
    fid = frechet_distance(stats.mu, stats.sigma, mu, sigma)
    is_mean, is_std = inception_score(stats.logits, splits=10)
    compute_metrics("samples.npz", "adm_in256_stats.npz", device=device)  # {'fid', 'inception_score', ...}

**Images** (``images`` arguments): a folder of image files (PNG/JPEG, read as RGB, sorted by
name), an ADM-format ``.npz`` (``arr_0``: uint8 N x H x W x 3, streamed batch by batch) or
``.npy``, a uint8 array (numpy: N x H x W x 3, torch: N x 3 x H x W; the other layout is accepted
when unambiguous), or an iterable of such uint8 batches.

**Extractors**: anything callable on uint8 images ``[B, 3, H, W]`` (on ``device``) that returns
the features ``[B, F]`` and optionally logits ``[B, C]``: a tensor (features only), a tuple
``(features,)`` / ``(features, logits)``, or a dict with ``"features"`` and optional ``"logits"``.
``torch.nn.Module`` extractors are moved to ``device`` and put in eval mode.  Any extractor
registered with :func:`torch_fidelity.register_feature_extractor` is available through
:func:`create_extractor` (that is how Inception is built).  A small classifier can stand in for
Inception (tests, the CPU demo); its FID/IS are then of course not comparable to the paper's.

**Inception weights**: torch-fidelity's converted TF weights (:data:`INCEPTION_WEIGHTS_URL`),
looked up in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where torch-fidelity keeps them
too) and downloaded there if missing; on offline machines pass ``--inception_weights PATH``.  The
weights are always read with ``torch.load(weights_only=True)``.

CLI::

    python -m lpd.metrics stats --input REF_FOLDER_OR_NPZ --output STATS.npz [--inception_weights PATH]
    python -m lpd.metrics fid --input SAMPLES_FOLDER_OR_NPZ --stats STATS.npz [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, NamedTuple, Union

import numpy as np
import torch

from lpd import hub

__all__ = [
    "INCEPTION_NAME",
    "INCEPTION_FEATURES",
    "INCEPTION_LOGITS",
    "INCEPTION_WEIGHTS_URL",
    "IMAGE_EXTENSIONS",
    "StatisticsError",
    "FeatureStatistics",
    "TorchFidelityExtractor",
    "resolve_inception_weights",
    "create_extractor",
    "inception_extractor",
    "list_image_files",
    "count_images",
    "iter_image_batches",
    "compute_statistics",
    "frechet_distance",
    "inception_score",
    "save_statistics",
    "load_statistics",
    "metrics_from_statistics",
    "compute_metrics",
    "main",
]

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FEATURES = "2048"  # pool features, for FID
INCEPTION_LOGITS = "logits_unbiased"  # 1008 logits without the fc bias, for IS (as torch-fidelity)
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

ImageSource = Union[str, os.PathLike, np.ndarray, torch.Tensor, Iterable]
Extractor = Callable[[torch.Tensor], Any]
StatsLike = Union[str, os.PathLike, tuple]


class StatisticsError(ValueError):
    """A statistics file or array that is not ``mu`` (F,) and ``sigma`` (F, F)."""


class FeatureStatistics(NamedTuple):
    """What one pass of an extractor over a set of images gives."""

    mu: np.ndarray  # (F,) float64 mean of the features
    sigma: np.ndarray  # (F, F) float64 covariance (unbiased, as numpy.cov)
    logits: np.ndarray | None  # (N, C) float32 logits in image order, None if the extractor has none
    num_images: int


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------

class TorchFidelityExtractor(torch.nn.Module):
    """Adapts a torch-fidelity feature extractor (which returns a tuple in the order of its
    requested features) to ``images -> (features, logits)``."""

    def __init__(self, extractor: torch.nn.Module, features: str, logits: str | None):
        super().__init__()
        names = list(extractor.get_requested_features_list())
        self.extractor = extractor
        self.features_name, self.logits_name = features, logits
        self._fi = names.index(features)
        self._li = names.index(logits) if logits is not None else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.extractor(images)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return out[self._fi], (out[self._li] if self._li is not None else None)


def resolve_inception_weights(path: str | os.PathLike | None = None, *, download: bool = True) -> str:
    """Local path of torch-fidelity's Inception-v3 weights.

    ``path`` (``--inception_weights``) wins and must exist (nothing is downloaded then).
    Otherwise ``$TORCH_HOME/hub/checkpoints/<file>`` is used, downloaded from
    :data:`INCEPTION_WEIGHTS_URL` if missing (not when ``download`` is false or
    ``HF_HUB_OFFLINE=1``).  Raises :class:`lpd.hub.ResolveError` with the URL and the flag.
    """
    return hub.url_file(
        INCEPTION_WEIGHTS_URL,
        cache_dir=os.path.join(torch.hub.get_dir(), "checkpoints"),
        path=path,
        flag="--inception_weights",
        what="torch-fidelity Inception-v3 weights",
        download=download,
    )


@contextlib.contextmanager
def _weights_only_torch_load():
    """Make every ``torch.load`` inside the block weights-only (torch-fidelity's own call says
    unrestricted unpickling); restores the environment afterwards."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def create_extractor(
    name: str = INCEPTION_NAME,
    *,
    features: str | None = None,
    logits: str | None = "default",
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
    **kwargs: Any,
) -> TorchFidelityExtractor:
    """Build a feature extractor registered in torch-fidelity (``register_feature_extractor``).

    ``features`` / ``logits`` name the outputs used for FID and IS; by default the extractor's
    own choice for the ``fid`` and ``isc`` metrics (``"2048"`` and ``"logits_unbiased"`` for
    Inception); ``logits=None`` computes no IS.  For ``inception-v3-compat`` the weights are
    resolved by :func:`resolve_inception_weights`.  A ``weights_path`` is passed to the extractor
    as ``feature_extractor_weights_path`` and every ``torch.load`` during construction is then
    forced weights-only; a file that is not a plain state dict is refused with a ``ValueError``.
    Other keyword arguments go to the extractor's constructor.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"feature extractor {name!r} is not registered in torch-fidelity "
                         f"(registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)})")
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    if features is None:
        features = cls.get_default_feature_layer_for_metric("fid")
    if logits == "default":
        try:
            logits = cls.get_default_feature_layer_for_metric("isc")
        except Exception:  # extractor without a classifier head
            logits = None
    requested = [features] + ([logits] if logits is not None and logits != features else [])
    kwargs.setdefault("verbose", False)
    if name == INCEPTION_NAME:
        weights_path = resolve_inception_weights(weights_path, download=download)
    if weights_path is not None:
        kwargs["feature_extractor_weights_path"] = os.fspath(weights_path)
    # a weights file we hand over is only ever unpickled weights-only (torch-fidelity itself
    # calls an unrestricted torch.load on it)
    guard = _weights_only_torch_load() if weights_path is not None else contextlib.nullcontext()
    try:
        with guard:
            extractor = cls(name, requested, **kwargs)
    except Exception as exc:
        if weights_path is None:
            raise
        raise ValueError(
            f"could not load the weights of feature extractor {name!r} from {weights_path} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}). "
            f"The file must be a plain state dict (it is loaded with weights_only=True); for Inception "
            f"use the file from {INCEPTION_WEIGHTS_URL} and pass it with --inception_weights."
        ) from exc
    extractor.requires_grad_(False).eval()
    return TorchFidelityExtractor(extractor, features, logits).to(device)


def inception_extractor(
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    download: bool = True,
) -> TorchFidelityExtractor:
    """torch-fidelity's ``inception-v3-compat``: pool features (2048) and unbiased logits (1008)."""
    return create_extractor(INCEPTION_NAME, features=INCEPTION_FEATURES, logits=INCEPTION_LOGITS,
                            weights_path=weights_path, device=device, download=download)


def _split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalise an extractor's output to ``(features [B, F], logits [B, C] or None)``."""
    if isinstance(out, Mapping):
        if "features" not in out:
            raise TypeError(f"an extractor returning a dict must have a 'features' entry (got {sorted(out)})")
        feats, logits = out["features"], out.get("logits")
    elif isinstance(out, (tuple, list)):
        if not 1 <= len(out) <= 2:
            raise TypeError(f"an extractor returning a tuple must give (features,) or (features, logits), "
                            f"got {len(out)} items")
        feats, logits = out[0], (out[1] if len(out) == 2 else None)
    else:
        feats, logits = out, None
    feats = torch.as_tensor(feats)
    if feats.dim() != 2:
        feats = feats.flatten(1)
    if logits is not None:
        logits = torch.as_tensor(logits)
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    return feats, logits


# --------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------

def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Image files (:data:`IMAGE_EXTENSIONS`) directly in ``folder``, sorted by name."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran_order) of the .npy stream ``f``, left positioned at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return shape, dtype, fortran


def _npz_arr0_header(path: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "arr_0.npy" not in names:
                raise ValueError(f"{path} has no 'arr_0' (expected the ADM format: arr_0 = uint8 N x H x W x 3); "
                                 f"it holds {[n[:-4] for n in names]}")
            with zf.open("arr_0.npy") as f:
                return _npy_header(f)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a valid .npz file ({exc})") from None


def _check_images(x: np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
    """uint8 images as a CPU/any-device tensor ``[B, 3, H, W]``."""
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        t = torch.from_numpy(x if x.flags.writeable else x.copy())
    else:
        t = x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected uint8 image arrays, got {type(x).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{where}: images must be uint8 in [0, 255] (got {t.dtype}); convert e.g. with "
                        f"(x.clamp(0, 1) * 255).round().to(torch.uint8)")
    if t.dim() != 4:
        raise ValueError(f"{where}: expected a batch of images with 4 dimensions, got shape {tuple(t.shape)}")
    # numpy arrays are channels-last (N H W 3, the ADM layout), tensors channels-first (N 3 H W);
    # the other layout is accepted when it is unambiguous.
    layouts = ("last", "first") if isinstance(x, np.ndarray) else ("first", "last")
    for layout in layouts:
        if layout == "last" and t.shape[-1] == 3:
            return t.permute(0, 3, 1, 2).contiguous()
        if layout == "first" and t.shape[1] == 3:
            return t
    raise ValueError(f"{where}: images must have 3 (RGB) channels, got shape {tuple(t.shape)}")


def count_images(source: ImageSource) -> int | None:
    """Number of images in ``source`` if it can be known without reading them, else ``None``."""
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if os.path.isdir(p):
            return len(list_image_files(p))
        if p.endswith(".npz") and os.path.isfile(p):
            return int(_npz_arr0_header(p)[0][0])
        if p.endswith(".npy") and os.path.isfile(p):
            return int(np.load(p, mmap_mode="r").shape[0])
        return None
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return int(source.shape[0])
    return None


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.files[i]


def _stack_same_size(items: list[tuple[torch.Tensor, str]]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t, _ in items}
    if len(shapes) > 1:
        detail = ", ".join(f"{os.path.basename(f)}: {tuple(t.shape[1:])}" for t, f in items[:4])
        raise ValueError(f"images of different sizes in one batch ({detail}, ...); all images must share a size")
    return torch.stack([t for t, _ in items])


def iter_image_batches(source: ImageSource, batch_size: int = 50, *, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Yield uint8 batches ``[b, 3, H, W]`` (CPU) from any image source (see the module doc)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if os.path.isdir(p):
            loader = torch.utils.data.DataLoader(_ImageFiles(list_image_files(p)), batch_size=batch_size,
                                                 shuffle=False, num_workers=num_workers,
                                                 collate_fn=_stack_same_size)
            yield from loader
            return
        if not os.path.isfile(p):
            raise FileNotFoundError(f"image source {p} does not exist (expected a folder of images or an .npz)")
        if p.endswith(".npz"):
            yield from _iter_npz(p, batch_size)
            return
        if p.endswith(".npy"):
            arr = np.load(p, mmap_mode="r")
            for i in range(0, arr.shape[0], batch_size):
                yield _check_images(np.array(arr[i:i + batch_size]), p)
            return
        raise ValueError(f"image source {p} is neither a folder nor an .npz/.npy file")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        whole = _check_images(source, "images")
        for i in range(0, whole.shape[0], batch_size):
            yield whole[i:i + batch_size]
        return
    if isinstance(source, Iterable):
        for k, batch in enumerate(source):
            yield _check_images(batch, f"batch {k}")
        return
    raise TypeError(f"unsupported image source of type {type(source).__name__}")


def _iter_npz(path: str, batch_size: int) -> Iterator[torch.Tensor]:
    shape, dtype, fortran = _npz_arr0_header(path)
    if dtype != np.uint8 or fortran or len(shape) != 4:
        if dtype != np.uint8:
            raise TypeError(f"{path}: arr_0 must be uint8 (ADM format), got {dtype}")
        with np.load(path, allow_pickle=False) as data:  # unusual layout: read it whole
            arr = data["arr_0"]
        for i in range(0, arr.shape[0], batch_size):
            yield _check_images(arr[i:i + batch_size], path)
        return
    per_image = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        _npy_header(f)
        for i in range(0, shape[0], batch_size):
            b = min(batch_size, shape[0] - i)
            buf = f.read(b * per_image)
            if len(buf) != b * per_image:
                raise ValueError(f"{path}: arr_0 is truncated (image {i + len(buf) // per_image} of {shape[0]})")
            yield _check_images(np.frombuffer(buf, dtype=np.uint8).reshape((b,) + tuple(shape[1:])), path)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

class _Moments:
    """Running mean and covariance in float64, shifted by the first batch's mean for accuracy."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feature size changed from {self.shift.shape[0]} to {x.shape[1]}")
        d = x - self.shift
        self.s1 += d.sum(axis=0)
        self.s2 += d.T @ d
        self.n += x.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.n}")
        m = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return self.shift + m, (sigma + sigma.T) / 2


def _prepare(extractor: Extractor, device: torch.device) -> Extractor:
    if isinstance(extractor, torch.nn.Module):
        extractor = extractor.to(device).eval()
    return extractor


def compute_statistics(
    images: ImageSource,
    extractor: Extractor | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    *,
    num_workers: int = 0,
    progress: bool = True,
    keep_logits: bool = True,
    inception_weights: str | os.PathLike | None = None,
) -> FeatureStatistics:
    """One pass of ``extractor`` (default: Inception, see :func:`inception_extractor`) over
    ``images``: mean and covariance of the features and, if the extractor gives them, the logits."""
    device = torch.device(device)
    if extractor is None:
        extractor = inception_extractor(inception_weights, device)
    extractor = _prepare(extractor, device)
    moments = _Moments()
    logits_parts: list[np.ndarray] = []
    has_logits: bool | None = None
    from tqdm import tqdm

    bar = tqdm(total=count_images(images), unit="img", desc="features", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for batch in iter_image_batches(images, batch_size, num_workers=num_workers):
                feats, logits = _split_output(extractor(batch.to(device, non_blocking=True)))
                if feats.shape[0] != batch.shape[0]:
                    raise ValueError(f"the extractor returned {feats.shape[0]} feature rows for {batch.shape[0]} images")
                moments.update(feats.detach().to("cpu", torch.float64).numpy())
                if has_logits is None:
                    has_logits = logits is not None
                if keep_logits and has_logits:
                    if logits is None:
                        raise ValueError("the extractor returned logits for some batches but not for others")
                    logits_parts.append(logits.detach().to("cpu", torch.float32).numpy())
                bar.update(batch.shape[0])
    finally:
        bar.close()
    if moments.n == 0:
        raise ValueError("no images were found in the image source")
    mu, sigma = moments.result()
    logits_all = np.concatenate(logits_parts) if logits_parts else None
    return FeatureStatistics(mu, sigma, logits_all, moments.n)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    import scipy.linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular / ill-conditioned products are handled by the caller
        out = scipy.linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((sigma1 sigma2)^(1/2))`` for symmetric PSD matrices via symmetric eigendecompositions."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = half @ sigma2 @ half
    e = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(e, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, *, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    ``method="sqrtm"`` (default) is the reference computation (TTUR, pytorch-fid, ADM, the
    torch-fidelity the paper used): ``scipy.linalg.sqrtm`` in float64; when the product is
    singular (non-finite root) or the root has a significant imaginary part, ``eps`` is added to
    both diagonals and the root retaken; negligible imaginary parts are dropped.  It is slow for
    2048-d features on a CPU (tens of seconds to minutes).  ``method="eigh"`` computes the same
    trace exactly for symmetric positive semi-definite covariances as
    ``sum sqrt(eig(sigma1^(1/2) sigma2 sigma1^(1/2)))`` with symmetric eigensolvers, an order of
    magnitude faster (agrees with ``sqrtm`` to ~1e-12 relative on well-conditioned inputs).
    """
    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means have different or bad shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances must both be {mu1.shape[0]}x{mu1.shape[0]}, "
                         f"got {sigma1.shape} and {sigma2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2))

    covmean = _sqrtm(sigma1 @ sigma2)
    offset_used = False
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        offset_used = True
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3) and not offset_used:
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"the matrix square root has a large imaginary component "
                                 f"({np.max(np.abs(covmean.imag)):.3g}); the covariances are too "
                                 f"ill-conditioned (too few images for the feature size?)")
            covmean = covmean.real
    if not np.isfinite(covmean).all():
        raise ValueError("the matrix square root is not finite even with an eps offset")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits_or_probs: np.ndarray | torch.Tensor, splits: int = 10, *,
                    from_logits: bool | None = None, shuffle: bool = True, seed: int = 2020) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``: mean and std over ``splits`` splits.

    Matches torch-fidelity (``isc_features_to_metric``): rows shuffled with
    ``np.random.RandomState(seed)`` (unless ``shuffle`` is false), split ``i`` is rows
    ``[i N // splits, (i + 1) N // splits)``, float64, population std.  ``from_logits=None``
    treats the input as probabilities if every row is non-negative and sums to 1, else as logits.
    """
    x = logits_or_probs.detach().cpu().double().numpy() if isinstance(logits_or_probs, torch.Tensor) \
        else np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected [N, C] logits or probabilities, got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be between 1 and the number of images ({n}), got {splits}")
    if not np.isfinite(x).all():
        raise ValueError("logits/probabilities contain non-finite values")
    if from_logits is None:
        from_logits = not ((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    if from_logits:
        m = x.max(axis=1, keepdims=True)
        log_p = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
    else:
        p = x / x.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    scores = []
    for i in range(splits):
        pc, lpc = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        q = pc.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(pc > 0, pc * (lpc - np.log(q)), 0.0).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu`` (F,) and ``sigma`` (F, F) to the ``.npz`` ``path`` atomically (a temporary file
    in the same folder, fsync, ``os.replace``): readers never see a partial file."""
    mu, sigma = _check_stats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), "statistics to save")
    from lpd.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatisticsError(f"{where}: expected mu (F,) and sigma (F, F), got mu {mu.shape} and sigma {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatisticsError(f"{where}: mu/sigma contain non-finite values")
    return mu, sigma


_STATS_HINT = hub.FID_STATS_HINT


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``mu`` (F,) and ``sigma`` (F, F) as float64 from an ``.npz`` (other entries, e.g. of an
    ADM reference batch, are ignored).  Missing file: :class:`lpd.hub.ResolveError` (a
    ``FileNotFoundError``) naming ``--fid_stats``; bad content: :class:`StatisticsError`."""
    p = hub.local_file(path, what="FID reference statistics file", flag="--fid_stats", hint=_STATS_HINT)
    try:
        with np.load(p, allow_pickle=False) as data:
            keys = list(data.files)
            if "mu" not in keys or "sigma" not in keys:
                raise StatisticsError(f"{p} is not a statistics file: it needs entries 'mu' and 'sigma', "
                                      f"it has {keys}. {_STATS_HINT}")
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except StatisticsError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise StatisticsError(f"cannot read statistics file {p}: {exc}. {_STATS_HINT}") from None
    return _check_stats(mu, sigma, p)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _reference(reference: StatsLike) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(reference, (str, os.PathLike)):
        return load_statistics(reference)
    if isinstance(reference, FeatureStatistics):
        return reference.mu, reference.sigma
    if isinstance(reference, (tuple, list)) and len(reference) == 2:
        return _check_stats(np.asarray(reference[0], np.float64), np.asarray(reference[1], np.float64),
                            "reference statistics")
    raise TypeError("reference statistics must be a path to an .npz or a (mu, sigma) pair")


def metrics_from_statistics(stats: FeatureStatistics, reference: StatsLike | None = None,
                            splits: int = 10, *, fid_method: str = "sqrtm") -> dict[str, Any]:
    """FID of ``stats`` against ``reference`` (path or ``(mu, sigma)``; ``None``: no FID) and IS of
    its logits (``None`` without logits).  IS uses ``min(splits, num_images)`` splits;
    ``fid_method`` is :func:`frechet_distance`'s ``method``."""
    fid = None
    if reference is not None:
        mu_r, sigma_r = _reference(reference)
        if mu_r.shape != stats.mu.shape:
            raise StatisticsError(f"the reference statistics are of {mu_r.shape[0]}-d features but the "
                                  f"extractor gives {stats.mu.shape[0]}-d ones; they were made with another "
                                  f"feature extractor")
        fid = frechet_distance(stats.mu, stats.sigma, mu_r, sigma_r, method=fid_method)
    is_mean = is_std = None
    if stats.logits is not None:
        s = min(splits, stats.num_images)
        if s < splits:
            warnings.warn(f"only {stats.num_images} images: Inception Score over {s} splits instead of {splits}")
        is_mean, is_std = inception_score(stats.logits, s)
    return {"fid": fid, "inception_score": is_mean, "inception_score_std": is_std, "num_images": stats.num_images}


def compute_metrics(
    images: ImageSource,
    reference: StatsLike | None,
    extractor: Extractor | None = None,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    inception_weights: str | os.PathLike | None = None,
    splits: int = 10,
    num_workers: int = 0,
    progress: bool = True,
    download: bool = True,
    fid_method: str = "sqrtm",
) -> dict[str, Any]:
    """FID (against ``reference``) and IS of ``images`` in one feature pass.

    Returns ``{"fid", "inception_score", "inception_score_std", "num_images"}`` (``fid`` is None
    when ``reference`` is None, the IS entries when the extractor gives no logits).  The
    reference and the extractor (default Inception, weights from ``inception_weights``) are
    checked before any image is read, so missing files fail fast.
    """
    ref = _reference(reference) if reference is not None else None
    if extractor is None:
        extractor = inception_extractor(inception_weights, device, download=download)
    stats = compute_statistics(images, extractor, batch_size, device, num_workers=num_workers, progress=progress)
    return metrics_from_statistics(stats, ref, splits, fid_method=fid_method)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m lpd.metrics", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--input", required=True, help="folder of images, or an ADM .npz (arr_0: uint8 N x H x W x 3)")
        s.add_argument("--inception_weights", default=None,
                       help=f"path to torch-fidelity's Inception weights (default: torch hub cache, downloaded "
                            f"from {INCEPTION_WEIGHTS_URL})")
        s.add_argument("--batch_size", type=int, default=50)
        s.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        s.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes")
        s.add_argument("--no_progress", action="store_true", help="no progress bar")

    s = sub.add_parser("stats", allow_abbrev=False, help="write the feature statistics (mu, sigma) of reference images")
    common(s)
    s.add_argument("--output", required=True, help="statistics file to write (.npz with mu, sigma)")
    f = sub.add_parser("fid", allow_abbrev=False, help="print FID (against a statistics file) and Inception Score of images")
    common(f)
    f.add_argument("--stats", "--fid_stats", dest="stats", required=True, help="reference statistics (.npz)")
    f.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    f.add_argument("--fid_method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="matrix square root: scipy sqrtm (reference) or symmetric eigh (much faster)")
    f.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lpd.metrics``; returns the exit status."""
    args = _parser().parse_args(argv)
    device = torch.device(args.device or _default_device())
    try:
        if args.command == "stats":
            extractor = inception_extractor(args.inception_weights, device)
            stats = compute_statistics(args.input, extractor, args.batch_size, device, num_workers=args.num_workers,
                                       progress=not args.no_progress, keep_logits=False)
            save_statistics(args.output, stats.mu, stats.sigma)
            print(f"wrote {args.output}: mu {stats.mu.shape}, sigma {stats.sigma.shape} from {stats.num_images} images")
        else:
            result = compute_metrics(args.input, args.stats, batch_size=args.batch_size, device=device,
                                     inception_weights=args.inception_weights, splits=args.splits,
                                     num_workers=args.num_workers, progress=not args.no_progress,
                                     fid_method=args.fid_method)
            print(f"FID {result['fid']:.4f}  IS {result['inception_score']:.2f} ± {result['inception_score_std']:.2f}"
                  f"  ({result['num_images']} images)")
            if args.json:
                from lpd.checkpoint import atomic_write_bytes

                text = json.dumps(result, indent=2).encode()
                atomic_write_bytes(args.json, lambda fh: fh.write(text))
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
