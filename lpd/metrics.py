"""FID and Inception Score on upstream torch-fidelity's ``inception-v3-compat`` Inception-v3.

python -m lpd.metrics stats --input REF_IMAGES --output STATS.npz [--inception_weights PATH]
python -m lpd.metrics stats --input IMAGENET/val --img_size 256 --output STATS.npz
python -m lpd.metrics fid --input SAMPLES --stats STATS.npz [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from unittest import mock

import numpy as np
import torch
from tqdm import tqdm

from lpd import hub
from lpd.config import HelpFormatter, check_positive
from lpd.distributed import resolve_device
from lpd.files import atomic_write_bytes, check_output_path
from lpd.images import IMAGE_EXTENSIONS, DataError, ImageFileError, image_folder, read_image

INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURES = 2048
ADM_FORMAT = "an ADM .npz (arr_0: uint8 N x H x W x 3)"

#: A folder of images, an ADM ``.npz`` or ``.npy`` path, uint8 numpy N x H x W x 3, uint8 tensor N x 3 x H x W.
Images = str | os.PathLike | np.ndarray | torch.Tensor
#: uint8 images ``[B, 3, H, W]`` on the device -> ``(features [B, F], logits [B, C] or None)``.
Extractor = Callable[[torch.Tensor], tuple]
_DECODE_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


class MetricsError(ValueError):
    """Images, statistics or an output path that cannot be used; the message names the file."""


class FeatureStatistics(NamedTuple):
    """Float64 feature mean (F,) and covariance (F, F), float32 logits (N, C) in image order or None."""

    mu: np.ndarray
    sigma: np.ndarray
    logits: np.ndarray | None
    num_images: int


def inception_cache() -> str:
    """Where downloaded Inception weights are kept: torch hub's ``checkpoints`` folder."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def resolve_inception_weights(
    path: str | os.PathLike | None = None, *, download: bool = True
) -> str:
    """Local Inception weights: ``path``, else the torch hub cache (downloaded there if missing)."""
    what, cache = "torch-fidelity Inception-v3 weights", inception_cache()
    kw = dict(path=path, flag="--inception_weights", what=what, download=download)
    return hub.url_file(INCEPTION_WEIGHTS_URL, cache_dir=cache, **kw)


def inception_extractor(
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    download: bool = True,
) -> torch.nn.Module:
    """torch-fidelity's ``inception-v3-compat``: uint8 images -> (pool 2048, logits 1008)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = resolve_inception_weights(weights_path, download=download)
    try:  # torch-fidelity's own torch.load is not weights-only: force it
        with mock.patch.dict(os.environ, {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}):
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
            features = ["2048", "logits_unbiased"]
            net = FeatureExtractorInceptionV3("inception-v3-compat", features, path)
    except Exception as exc:  # noqa: BLE001 - any unreadable weights file
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise MetricsError(
            f"cannot load the Inception weights {path} ({type(exc).__name__}: {reason}); they must "
            f"be a plain state dict (read with weights_only=True): download "
            f"{INCEPTION_WEIGHTS_URL} and pass it with --inception_weights"
        ) from None
    return net.to(device)


def _nchw(x: np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
    """uint8 images as a tensor [B, 3, H, W]; numpy input is N x H x W x 3, torch input N x 3 x H x W."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise MetricsError(
                f"{where}: expected uint8 RGB images N x H x W x 3, got {x.dtype} {x.shape}"
            )
        return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise MetricsError(
            f"{where}: expected uint8 RGB images N x 3 x H x W, got {x.dtype} {tuple(x.shape)}; "
            f"convert with (x.clamp(0, 1) * 255).round().to(torch.uint8)"
        )
    return x


def _read(path: str) -> np.ndarray:
    try:
        return np.asarray(read_image(path))  # by its mode: 16-bit greys are not white
    except ImageFileError as exc:
        raise MetricsError(
            f"{path} is not a readable image ({exc}); re-save or remove it"
        ) from None


def _file_batches(files: list[str], batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(files), batch_size):
        arrays = [_read(path) for path in files[i : i + batch_size]]
        if len({a.shape for a in arrays}) > 1:
            sizes = ", ".join(
                f"{os.path.basename(f)}: {a.shape[:2]}" for f, a in zip(files[i:], arrays[:4])
            )
            raise MetricsError(
                f"images of different sizes in one batch ({sizes}, ...); all must share a size"
            )
        yield _nchw(np.stack(arrays), files[i])


def _npz_batches(path: str, batch_size: int) -> Iterator[Any]:
    """Yields the image count, then batches of ``arr_0`` read straight from the zip member (never all of it)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if "arr_0.npy" not in zf.namelist():
                raise MetricsError(
                    f"{path} has no arr_0 (expected {ADM_FORMAT}); it holds {zf.namelist()}"
                )
            with zf.open("arr_0.npy") as f:
                fmt = np.lib.format
                read = fmt.read_array_header_1_0 if fmt.read_magic(f)[0] == 1 else None
                shape, fortran, dtype = (read or fmt.read_array_header_2_0)(f)
                if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                    raise MetricsError(
                        f"{path}: arr_0 is {dtype} {shape}{' in Fortran order' if fortran else ''}; "
                        f"expected {ADM_FORMAT}, C order"
                    )
                yield shape[0]
                per_image = int(np.prod(shape[1:]))
                for i in range(0, shape[0], batch_size):
                    b = min(batch_size, shape[0] - i)
                    buf = f.read(b * per_image)
                    if len(buf) != b * per_image:
                        raise MetricsError(
                            f"{path}: arr_0 is truncated at image {i + len(buf) // per_image}"
                        )
                    yield _nchw(np.frombuffer(buf, np.uint8).reshape((b, *shape[1:])), path)
    except _DECODE_ERRORS as exc:
        if isinstance(exc, MetricsError):
            raise
        raise MetricsError(f"cannot read {path} ({exc}); expected {ADM_FORMAT}") from None


def _image_folder_batches(root: str, batch_size: int, img_size: int) -> tuple[int, Iterator]:
    """An ImageFolder (class folders, or a folder with train/) read as by main_cache.py."""
    try:
        data = image_folder(root, img_size)
    except (OSError, ValueError):  # no class folder, or no image in them
        raise MetricsError(
            f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
            f"nor class folders of them (an ImageFolder)"
        ) from None

    def crop(j: int) -> torch.Tensor:
        try:
            return data[j][0]
        except DataError as exc:  # names the file
            raise MetricsError(
                f"{data.samples[j][0]} is not a readable image ({exc.__cause__}); re-save or remove it"
            ) from None

    n, to_uint8 = len(data), lambda x: (x + 1.0).mul_(127.5).round_().to(torch.uint8)
    steps = range(0, n, batch_size)
    return n, (to_uint8(torch.stack([crop(j) for j in range(i, n)[:batch_size]])) for i in steps)


def _array_batches(arr: Any, batch_size: int, where: str) -> tuple[int, Iterator[torch.Tensor]]:
    _nchw(arr[:0], where)
    return len(arr), (_nchw(arr[i : i + batch_size], where) for i in range(0, len(arr), batch_size))


def image_batches(images: Images, batch_size: int, img_size: int = 256) -> tuple[int, Iterator]:
    """(count, uint8 [b, 3, H, W] CPU batches) of checked ``images``, counted without decoding; an
    ImageFolder (class folders) is ADM-cropped to ``img_size``, the rest kept as is."""
    check_positive(batch_size, "batch_size", MetricsError)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return _array_batches(images, batch_size, "images")
    if not isinstance(images, (str, os.PathLike)):
        raise TypeError(
            f"images must be a path, a numpy array or a tensor, got {type(images).__name__}"
        )
    p = os.fspath(images)
    if os.path.isdir(p):
        files = [
            os.path.join(p, f)
            for f in sorted(os.listdir(p))
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
        if not files:
            return _image_folder_batches(p, batch_size, img_size)
        return len(files), _file_batches(files, batch_size)
    if not os.path.isfile(p):
        raise MetricsError(
            f"{p} does not exist (expected a folder of images, {ADM_FORMAT} or an .npy)"
        )
    if p.endswith(".npz"):
        batches = _npz_batches(p, batch_size)
        return next(batches), batches
    if p.endswith(".npy"):
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except _DECODE_ERRORS as exc:
            raise MetricsError(
                f"cannot read {p} ({exc}); expected an .npy of uint8 N x H x W x 3"
            ) from None
        return _array_batches(arr, batch_size, p)
    raise MetricsError(f"{p} is neither a folder of images nor an .npz/.npy file")


def compute_statistics(
    images: Images,
    extractor: Extractor,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    *,
    progress: bool = True,
    img_size: int = 256,
) -> FeatureStatistics:
    """Float64 mean and covariance of the features and the logits, in one pass over ``images``."""
    num, batches = image_batches(images, batch_size, img_size)
    if num < 2:
        raise MetricsError(f"statistics need at least 2 images, got {num}")
    n, shift, s1, s2, logits = 0, None, None, None, []
    bar = tqdm(total=num, unit="img", desc="features", disable=not progress)
    with torch.inference_mode(), bar:
        for batch in batches:
            feats, lg = extractor(batch.to(device))
            x = feats.detach().to("cpu", torch.float64).flatten(1).numpy()
            if shift is None:  # shifted sums: accurate covariances from one pass
                shift, s1, s2 = x.mean(0), np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
            d = x - shift
            s1 += d.sum(0)
            s2 += d.T @ d
            n += len(x)
            logits += [] if lg is None else [lg.detach().to("cpu", torch.float32).numpy()]
            bar.update(len(x))
    logits = np.concatenate(logits) if logits else None
    if logits is not None and len(logits) != n:
        raise MetricsError("the extractor returned logits for some batches only")
    m = s1 / n
    sigma = (s2 - n * np.outer(m, m)) / (n - 1)
    return FeatureStatistics(shift + m, (sigma + sigma.T) / 2, logits, n)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    import scipy.linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products are handled by the caller
        return scipy.linalg.sqrtm(a)


def _large_imaginary(c: np.ndarray) -> bool:
    return np.iscomplexobj(c) and not np.allclose(np.diagonal(c).imag, 0, atol=1e-3)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` with scipy's sqrtm in float64, as ADM."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise MetricsError(f"means have different or bad shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise MetricsError(
            f"covariances must both be {len(mu1)}x{len(mu1)}, got {sigma1.shape} and {sigma2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise MetricsError("the means or covariances have non-finite values")
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or _large_imaginary(covmean):  # singular: regularise once
        offset = np.eye(len(mu1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if _large_imaginary(covmean):
        raise MetricsError(
            f"the matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g}): "
            f"the covariances are too ill-conditioned (too few images for the feature size?)"
        )
    covmean = covmean.real
    if not np.isfinite(covmean).all():
        raise MetricsError("the matrix square root is not finite even with an eps offset")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over ``splits``, as torch-fidelity: rows shuffled by RandomState(2020), float64 softmax."""
    x = torch.as_tensor(logits)
    if x.dim() != 2:
        raise ValueError(f"expected logits [N, C], got shape {tuple(x.shape)}")
    n = len(x)
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be between 1 and the number of images ({n}), got {splits}")
    x = x[np.random.RandomState(2020).permutation(n)].double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    cuts = [i * n // splits for i in range(1, splits)]
    scores = [
        (pc * (lpc - pc.mean(dim=0, keepdim=True).log())).sum(dim=1).mean().exp().item()
        for pc, lpc in zip(p.tensor_split(cuts), log_p.tensor_split(cuts))
    ]
    return float(np.mean(scores)), float(np.std(scores))


def _check_stats(mu: Any, sigma: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Float64 ``mu`` (F,) and ``sigma`` (F, F), checked."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricsError(
            f"{where}: expected mu (F,) and sigma (F, F), got mu {mu.shape} and sigma {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricsError(f"{where}: mu/sigma contain non-finite values")
    return mu, sigma


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu`` (F,) and ``sigma`` (F, F) to the ``.npz`` ``path`` atomically."""
    mu, sigma = _check_stats(mu, sigma, "statistics to save")
    atomic_write_bytes(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def load_statistics(
    path: str | os.PathLike, *, flag: str = "--fid_stats"
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 ``mu`` (F,) and ``sigma`` (F, F) of an ``.npz`` (other entries, as in ADM batches, are ignored)."""
    what, hint = "FID reference statistics file", hub.FID_STATS_HINT
    p = hub.local_file(path, what=what, flag=flag, hint=hint)
    try:
        data = np.load(p, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise MetricsError(f"{p} is an .npy array, not an .npz statistics file. {hint}")
        with data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise MetricsError(
                    f"{p} is not a statistics file: it needs entries 'mu' and 'sigma', it has "
                    f"{data.files}. {hint}"
                )
            mu, sigma = (np.asarray(data[k], np.float64) for k in ("mu", "sigma"))
    except _DECODE_ERRORS as exc:
        if isinstance(exc, MetricsError):
            raise
        raise MetricsError(f"cannot read statistics file {p}: {exc}. {hint}") from None
    return _check_stats(mu, sigma, p)


def compute_metrics(
    images: Images,
    reference: tuple[np.ndarray, np.ndarray] | None,
    extractor: Extractor,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = True,
    img_size: int = 256,
) -> dict[str, Any]:
    """``fid`` (None without ``reference``), ``inception_score(_std)``, ``num_images``."""
    if reference is not None:
        reference = _check_stats(reference[0], reference[1], "reference statistics")
    run = dict(progress=progress, img_size=img_size)
    stats = compute_statistics(images, extractor, batch_size, device, **run)
    fid = is_mean = is_std = None
    if reference is not None:
        if reference[0].shape != stats.mu.shape:
            raise MetricsError(
                f"the reference statistics are of {reference[0].shape[0]}-d features but the extractor "
                f"gives {stats.mu.shape[0]}-d ones; they were made with another feature extractor"
            )
        fid = frechet_distance(stats.mu, stats.sigma, *reference)
    if stats.logits is not None:
        if (splits := min(10, stats.num_images)) < 10:
            msg = f"only {splits} images: Inception Score over {splits} splits instead of 10"
            warnings.warn(msg, stacklevel=2)
        is_mean, is_std = inception_score(stats.logits, splits)
    scores = {"fid": fid, "inception_score": is_mean, "inception_score_std": is_std}
    return {**scores, "num_images": stats.num_images}


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an unwritable ``--output`` / ``--json``, an input, or a file of others."""
    npz = args.command == "stats"
    flag, path = ("--output", args.output) if npz else ("--json", args.json)
    inputs = [("--input", args.input), ("--stats", getattr(args, "stats", None))]

    def ours(p: str) -> bool:  # a statistics file (.npz) or a metrics record (.json) of ours
        try:
            with open(p, "rb") as f:
                if npz:
                    return {"mu.npy", "sigma.npy"} <= set(zipfile.ZipFile(f).namelist())
                record = json.load(f)
                return isinstance(record, dict) and {"fid", "num_images"} <= set(record)
        except (OSError, ValueError, zipfile.BadZipFile):
            return False

    if path and (problem := check_output_path(path, flag, inputs, args.overwrite, ours)):
        what = "a statistics file (.npz with mu and sigma)" if npz else ""
        what = what or "a metrics file of lpd.metrics fid"
        raise MetricsError(problem.replace("was not written by lpd", f"is not {what}"))


def _flagged(name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the flag ``name`` in front of a MetricsError's message."""
    try:
        return fn(*args, **kwargs)
    except MetricsError as exc:
        raise MetricsError(f"{name}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    kw = dict(allow_abbrev=False, formatter_class=HelpFormatter)
    p = argparse.ArgumentParser("python -m lpd.metrics", description=__doc__, **kw)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("stats", "write the Inception statistics (mu, sigma) of reference images"),
        ("fid", "print FID against a statistics file and the Inception Score of images"),
    ):
        add = sub.add_parser(name, help=text, description=text, **kw).add_argument
        add(
            "--input",
            required=True,
            help="folder of PNG/JPEG images, an ImageFolder (class "
            f"folders, read as main_cache.py does), {ADM_FORMAT} or an .npy",
        )
        add("--img_size", type=int, default=256, help="ADM crop of an ImageFolder")
        add(
            "--inception_weights",
            help="torch-fidelity's Inception weights (default: torch hub "
            f"cache, else {INCEPTION_WEIGHTS_URL})",
        )
        add("--batch_size", type=int, default=50)
        add("--device", help="torch device (default: the accelerator if any, else cpu)")
        add("--no_progress", action="store_true", help="no progress bar")
        add("--overwrite", action="store_true", help="replace an output file not one of ours")
        if name == "stats":
            add("--output", required=True, help="statistics file to write (.npz with mu, sigma)")
        else:
            add("--stats", "--fid_stats", required=True, help="reference statistics (.npz)")
            add("--json", help="also write the metrics to this JSON file")
    return p


def _run(args: argparse.Namespace) -> FeatureStatistics | dict[str, Any]:
    """Check the outputs, then every other flag and file, then compute."""
    _check_output(args)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise MetricsError(str(exc)) from None
    for flag in ("batch_size", "img_size"):
        check_positive(getattr(args, flag), f"--{flag}", MetricsError)
    _flagged("--input", image_batches, args.input, args.batch_size, args.img_size)  # not decoded
    run = dict(device=device, progress=not args.no_progress, img_size=args.img_size)
    if args.command == "stats":
        extractor = inception_extractor(args.inception_weights, device)
        return compute_statistics(args.input, extractor, args.batch_size, **run)
    ref = _flagged("--stats", load_statistics, args.stats, flag="--stats")
    if ref[0].shape != (INCEPTION_FEATURES,):
        raise MetricsError(
            f"--stats {args.stats} holds statistics of {ref[0].shape[0]}-d features; Inception "
            f"gives {INCEPTION_FEATURES}-d ones: make them with `python -m lpd.metrics stats`"
        )
    extractor = inception_extractor(args.inception_weights, device)
    return compute_metrics(args.input, ref, extractor, batch_size=args.batch_size, **run)


def main(argv: list[str] | None = None) -> int:
    """``python -m lpd.metrics``: 0, 2 for a usage error (found before decoding where a file check
    can tell), 1 when writing the finished result failed."""
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except (MetricsError, OSError) as exc:  # a ResolveError is an OSError of a clear message
        plain = isinstance(exc, (MetricsError, hub.ResolveError))
        why = exc if plain else f"cannot read {exc.filename or args.input}: {exc.strerror or exc}"
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        if args.command == "stats":
            save_statistics(args.output, result.mu, result.sigma)
            shapes = f"mu {result.mu.shape}, sigma {result.sigma.shape}"
            print(f"wrote {args.output}: {shapes} from {result.num_images} images")
        else:
            print(
                f"FID {result['fid']:.4f}  IS {result['inception_score']:.2f} ± "
                f"{result['inception_score_std']:.2f}  ({result['num_images']} images)"
            )
            if args.json:
                data = json.dumps(result, indent=2).encode()
                atomic_write_bytes(args.json, lambda f: f.write(data))
    except OSError as exc:
        target = args.output if args.command == "stats" else args.json
        print(f"error: could not write {target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
