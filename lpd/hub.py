"""Resolve released files (checkpoints, tokenizer, orders, FID statistics) to local paths.

Every resolver follows the same rule: a path given by the user wins (it must exist; nothing is
downloaded then); otherwise the file is looked up in a cache and, if missing and downloads are
allowed, fetched.  Whatever goes wrong, the error is a :class:`ResolveError` (a
``FileNotFoundError``) whose message names the file, where it comes from (repository and URL),
where it is expected on disk and the command-line flag that supplies it, e.g.::

    path = resolve_checkpoint("lpd_l", 256)                  # mit-han-lab/lpd_l_256 -> lpd_l_256.pth
    path = resolve_checkpoint("lpd_l", 256, path=args.pretrained_ckpt)
    vq = resolve_vq(args.vqgan_path)                          # FoundationVision/LlamaGen -> vq_ds16_c2i.pt
    orders = resolve_orders(256, 20, 2.0)                     # mit-han-lab/lpd_orders -> res256_steps20_repulsion2.json
    stats = resolve_fid_stats(256, path=args.fid_stats)       # adm_in256_stats.npz

Hugging Face files go through :func:`huggingface_hub.hf_hub_download` and its cache
(``HF_HUB_CACHE``, ``HF_HOME``; layout ``models--ORG--NAME/snapshots/<commit>/<file>`` with
``refs/main`` naming the commit), so a cache filled on another machine (``hf download REPO FILE``)
works offline.  The cache is always tried first without network access; ``HF_HUB_OFFLINE=1``
(read when the resolver is called) forbids any download, for Hub and plain-URL files alike.

Plain-URL files (the ADM FID statistics, torch-fidelity's Inception weights) go through
:func:`url_file`, which keeps them in a cache folder (``$LPD_CACHE``, default ``~/.cache/lpd``)
and downloads atomically.

In multi-process runs, resolve on one rank first (then barrier) so that only one process
downloads; concurrent calls are nevertheless safe (the Hub cache is file-locked, URL downloads
are written to a temporary file and renamed).

Where the released files live (as published by the LPD authors):

* checkpoints: ``mit-han-lab/lpd_{l,xl,xxl}_256`` and ``mit-han-lab/lpd_{l,xl}_512``; the
  released evaluation scripts load ``lpd_l_256.pth`` etc., so the file name is
  ``CHECKPOINT_FILENAME`` (``"{model}_{img_size}.pth"``).  Should a repository hold a single
  checkpoint under another name, it is found and used with a warning; ``filename=`` overrides.
* tokenizer: ``vq_ds16_c2i.pt`` in ``FoundationVision/LlamaGen``.
* orders: ``mit-han-lab/lpd_orders`` holds the pre-generated order files
  ``res{img_size}_steps{steps}_repulsion{threshold}.json`` (the names written by the released
  ``orders/run_lpd_order.sh``); they can also be generated locally.
* ADM reference statistics: not on the Hub from the authors; MAR (LTH14/mar) keeps
  ``fid_stats/adm_in256_stats.npz`` in its GitHub repository and the released LPD code reads
  ``fid_stats/adm_in{256,512}_stats.npz`` from its working tree.  See :data:`FID_STATS_SOURCES`;
  they can also be computed from OpenAI's ADM reference batches (:data:`ADM_REFERENCE_BATCHES`)
  with ``python -m lpd.metrics stats``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = [
    "ResolveError",
    "RELEASED_CHECKPOINTS",
    "CHECKPOINT_FILENAME",
    "VQ_REPO",
    "VQ_FILENAME",
    "ORDERS_REPO",
    "ORDERS_FILENAME",
    "FID_STATS_FILENAME",
    "FID_STATS_SOURCES",
    "FID_STATS_HINT",
    "ADM_REFERENCE_BATCHES",
    "hf_file",
    "hf_url",
    "hf_cache_dir",
    "is_offline",
    "lpd_cache_dir",
    "url_file",
    "local_file",
    "normalize_model_name",
    "CheckpointSource",
    "checkpoint_source",
    "resolve_checkpoint",
    "resolve_vq",
    "orders_filename",
    "resolve_orders",
    "resolve_fid_stats",
]

# --------------------------------------------------------------------------------------------
# What is released where
# --------------------------------------------------------------------------------------------

#: (model, img_size) -> Hugging Face repository of the released LPD checkpoint.
RELEASED_CHECKPOINTS: dict[tuple[str, int], str] = {
    ("lpd_l", 256): "mit-han-lab/lpd_l_256",
    ("lpd_xl", 256): "mit-han-lab/lpd_xl_256",
    ("lpd_xxl", 256): "mit-han-lab/lpd_xxl_256",
    ("lpd_l", 512): "mit-han-lab/lpd_l_512",
    ("lpd_xl", 512): "mit-han-lab/lpd_xl_512",
}
#: File name of a released checkpoint inside its repository (format fields: model, img_size).
#: Taken from the released evaluation scripts (``--pretrained_ckpt .../lpd_l_256.pth``).
CHECKPOINT_FILENAME = "{model}_{img_size}.pth"
_CHECKPOINT_EXTS = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

VQ_REPO = "FoundationVision/LlamaGen"
VQ_FILENAME = "vq_ds16_c2i.pt"

ORDERS_REPO = "mit-han-lab/lpd_orders"
#: Order file names, as written by the released ``orders/run_lpd_order.sh``.
ORDERS_FILENAME = "res{img_size}_steps{steps}_repulsion{threshold}.json"

FID_STATS_FILENAME = "adm_in{img_size}_stats.npz"
#: img_size -> URLs tried in order by :func:`resolve_fid_stats`.  The 256 px file is kept in MAR's
#: GitHub repository (widely used copy); the released LPD code reads both files from
#: ``fid_stats/`` of its own repository, so that is where the 512 px one is looked for.
FID_STATS_SOURCES: dict[int, tuple[str, ...]] = {
    256: (
        "https://github.com/LTH14/mar/raw/main/fid_stats/adm_in256_stats.npz",
        "https://github.com/mit-han-lab/lpd/raw/main/fid_stats/adm_in256_stats.npz",
    ),
    512: ("https://github.com/mit-han-lab/lpd/raw/main/fid_stats/adm_in512_stats.npz",),
}
#: OpenAI's ADM reference batches (guided-diffusion evaluations): arr_0 holds the reference images.
ADM_REFERENCE_BATCHES: dict[int, str] = {
    256: "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    512: "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz",
}
FID_STATS_HINT = (
    "The ADM ImageNet reference statistics (mu (2048,), sigma (2048, 2048) of Inception pool "
    "features) are kept as fid_stats/adm_in256_stats.npz in https://github.com/LTH14/mar and read "
    "from fid_stats/ by the released LPD code (https://github.com/mit-han-lab/lpd); a third-party "
    "mirror of both resolutions is https://huggingface.co/sinaalemohammad/Neon. They can also be "
    "computed from OpenAI's ADM reference batches (" + " and ".join(ADM_REFERENCE_BATCHES.values()) + ") with "
    "`python -m lpd.metrics stats --input VIRTUAL_imagenet512.npz --output adm_in512_stats.npz` (any "
    "reference images work the same way)."
)


class ResolveError(FileNotFoundError):
    """A released file could not be found or fetched; the message says how to provide it.

    Attributes: ``what`` (description of the file), ``source`` (repository or URL), ``url``,
    ``expected`` (the path or cache folder it was looked for in) and ``flag`` (the CLI flag).
    """

    def __init__(self, message: str, *, what: str = "", source: str = "", url: str = "",
                 expected: str = "", flag: str | None = None):
        super().__init__(message)
        self.what, self.source, self.url, self.expected, self.flag = what, source, url, expected, flag

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno/filename
        return self.args[0] if self.args else ""


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on", "y", "t"}


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was set at import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        return False


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The Hugging Face Hub cache folder used: ``cache_dir`` or, read now, ``HF_HUB_CACHE``,
    ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``/hub, ``XDG_CACHE_HOME``/huggingface/hub, ~/.cache/huggingface/hub."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return os.path.expanduser(os.path.expandvars(env[var]))
    if env.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(env["HF_HOME"])), "hub")
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def lpd_cache_dir(subdir: str = "") -> str:
    """Cache folder for plain-URL files: ``$LPD_CACHE`` or ``~/.cache/lpd`` (plus ``subdir``)."""
    root = os.environ.get("LPD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lpd")
    return os.path.join(os.path.expanduser(root), subdir) if subdir else os.path.expanduser(root)


def hf_url(repo_id: str, filename: str, revision: str | None = None, repo_type: str | None = None) -> str:
    """The download URL of ``filename`` in a Hub repository (for messages)."""
    prefix = {None: "", "model": "", "dataset": "datasets/", "space": "spaces/"}.get(repo_type, "")
    return f"https://huggingface.co/{prefix}{repo_id}/resolve/{revision or 'main'}/{filename}"


# --------------------------------------------------------------------------------------------
# Local paths
# --------------------------------------------------------------------------------------------

def local_file(path: str | os.PathLike, *, what: str = "file", flag: str | None = None,
               source: str | None = None, hint: str = "") -> str:
    """Return ``path`` (user expanded) if it is an existing file, else raise :class:`ResolveError`.

    ``what`` describes the file ("LlamaGen VQ tokenizer"), ``flag`` is the option that gave it,
    ``source`` where it is published (URL), ``hint`` a further sentence for the message.
    """
    p = os.path.expanduser(os.fspath(path))
    if os.path.isfile(p):
        return p
    reason = "is a directory, not a file" if os.path.isdir(p) else "does not exist"
    msg = f"The {what} given{f' with {flag}' if flag else ''} ({p}) {reason}."
    if source:
        msg += f"\n  It is published at {source}; download it and pass its path"
        msg += f" with {flag}." if flag else "."
    if hint:
        msg += f"\n  {hint}"
    raise ResolveError(msg, what=what, source=source or "", expected=p, flag=flag)


# --------------------------------------------------------------------------------------------
# Hugging Face Hub files
# --------------------------------------------------------------------------------------------

def _root_cause(exc: BaseException) -> str:
    """A one-line description of the innermost cause of ``exc``."""
    seen = set()
    inner = exc
    while (inner.__cause__ or inner.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}".rstrip(": ")


def _hub_fix_lines(repo_id: str, filename: str, url: str, cache: str, flag: str | None,
                   repo_type: str | None) -> str:
    type_arg = f" --repo-type {repo_type}" if repo_type and repo_type != "model" else ""
    lines = ["  How to provide it:"]
    if flag:
        lines.append(f"    - download {url} on a machine with network access and pass its path: "
                     f"{flag} /path/to/{os.path.basename(filename)}")
    else:
        lines.append(f"    - download {url} on a machine with network access")
    lines.append(f"    - or fill the Hugging Face cache with `hf download {repo_id} {filename}{type_arg}` "
                 f"(this machine's cache: {cache}; HF_HUB_CACHE / HF_HOME choose another) and copy the "
                 f"cache folder here; it is used without network access")
    return "\n".join(lines)


def _cached_candidates(repo_id: str, cache: str, exts: Sequence[str], repo_type: str | None) -> list[str]:
    """Files with one of ``exts`` in any cached snapshot of ``repo_id``."""
    kind = {None: "models", "model": "models", "dataset": "datasets", "space": "spaces"}.get(repo_type, "models")
    snaps = Path(cache) / f"{kind}--{repo_id.replace('/', '--')}" / "snapshots"
    if not snaps.is_dir():
        return []
    found = sorted({str(p.relative_to(s)) for s in snaps.iterdir() if s.is_dir()
                    for p in s.rglob("*") if p.is_file() and p.suffix in exts})
    return found


def hf_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    repo_type: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    flag: str | None = None,
    what: str | None = None,
    download: bool = True,
    fallback_exts: Sequence[str] = (),
) -> str:
    """Local path of ``filename`` from the Hub repository ``repo_id``.

    ``path`` (a user-given file) wins and must exist.  Otherwise the cache is tried without
    network access, then (unless ``download`` is false or ``HF_HUB_OFFLINE`` is set) the file is
    downloaded with :func:`huggingface_hub.hf_hub_download`.  If the repository turns out not to
    hold ``filename`` but exactly one file ending in one of ``fallback_exts``, that file is used
    (with a warning).  Failures raise :class:`ResolveError` naming the file, the repository, the
    URL, the cache folder and ``flag``.
    """
    what = what or filename
    url = hf_url(repo_id, filename, revision, repo_type)
    if path is not None:
        return local_file(path, what=what, flag=flag, source=url)

    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    cache = hf_cache_dir(cache_dir)
    kwargs = dict(revision=revision, repo_type=repo_type, cache_dir=cache)

    def error(reason: str, exc: BaseException | None = None) -> ResolveError:
        msg = (f"Could not get the {what} ({filename}) from the Hugging Face Hub repository {repo_id}: {reason}"
               f"\n  URL: {url}\n" + _hub_fix_lines(repo_id, filename, url, cache, flag, repo_type))
        return ResolveError(msg, what=what, source=repo_id, url=url, expected=cache, flag=flag)

    def use_fallback(candidates: list[str], where: str) -> str | None:
        picks = [c for c in candidates if c != filename]
        if len(picks) != 1:
            return None
        warnings.warn(f"{repo_id} has no {filename}; using its only checkpoint-like file {picks[0]} ({where})",
                      stacklevel=3)
        return picks[0]

    # 1. the cache, no network
    try:
        return hf_hub_download(repo_id, filename, local_files_only=True, **kwargs)
    except (hf_errors.LocalEntryNotFoundError, FileNotFoundError):
        pass
    except (OSError, ValueError) as exc:  # unreadable cache, invalid repo id, ...
        raise error(f"the cache lookup failed ({_root_cause(exc)})", exc) from None

    offline = is_offline()
    if offline or not download:
        if fallback_exts:
            alt = use_fallback(_cached_candidates(repo_id, cache, fallback_exts, repo_type), "found in the cache")
            if alt is not None:
                try:
                    return hf_hub_download(repo_id, alt, local_files_only=True, **kwargs)
                except (OSError, ValueError):
                    pass
        why = "offline mode (HF_HUB_OFFLINE=1) is on" if offline else "downloads are disabled"
        raise error(f"{why} and the file is not in the cache {cache}.")

    # 2. download
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except hf_errors.GatedRepoError as exc:
        raise error(f"the repository is gated; accept its terms on huggingface.co and log in "
                    f"(`hf auth login`) ({_root_cause(exc)}).", exc) from None
    except hf_errors.RepositoryNotFoundError as exc:
        raise error(f"the repository does not exist or is private ({_root_cause(exc)}).", exc) from None
    except hf_errors.RevisionNotFoundError as exc:
        raise error(f"revision {revision!r} does not exist ({_root_cause(exc)}).", exc) from None
    except hf_errors.RemoteEntryNotFoundError as exc:
        if fallback_exts:
            try:
                from huggingface_hub import list_repo_files

                files = [f for f in list_repo_files(repo_id, revision=revision, repo_type=repo_type)
                         if f.endswith(tuple(fallback_exts))]
            except Exception:  # listing is best effort
                files = []
            alt = use_fallback(files, "listed on the Hub")
            if alt is not None:
                return hf_file(repo_id, alt, revision=revision, repo_type=repo_type, cache_dir=cache,
                               flag=flag, what=what, download=download)
        raise error(f"the repository has no file {filename} ({_root_cause(exc)}).", exc) from None
    except hf_errors.LocalEntryNotFoundError as exc:
        raise error(f"the Hub could not be reached and the file is not in the cache {cache} "
                    f"({_root_cause(exc)}).", exc) from None
    except (OSError, ValueError, RuntimeError) as exc:  # HTTP errors, disk full, ...
        raise error(f"the download failed ({_root_cause(exc)}).", exc) from None


# --------------------------------------------------------------------------------------------
# Plain-URL files
# --------------------------------------------------------------------------------------------

def _download_url(url: str, dst: str) -> None:
    """Download ``url`` to ``dst`` atomically (temporary file in the same folder, then rename)."""
    import torch.hub

    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=os.path.dirname(dst) or ".")
    os.close(fd)
    try:
        torch.hub.download_url_to_file(url, tmp, progress=True)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def url_file(
    urls: str | Sequence[str],
    *,
    cache_dir: str | os.PathLike,
    filename: str | None = None,
    path: str | os.PathLike | None = None,
    flag: str | None = None,
    what: str | None = None,
    download: bool = True,
    search_paths: Sequence[str | os.PathLike] = (),
    hint: str = "",
    validate: Callable[[str], None] | None = None,
) -> str:
    """Local path of a file published at ``urls`` (tried in order).

    ``path`` wins and must exist (nothing is downloaded then).  Otherwise ``search_paths`` and
    ``cache_dir/filename`` are checked, then the file is downloaded into ``cache_dir`` unless
    ``download`` is false or ``HF_HUB_OFFLINE`` is set.  ``validate(path)`` may raise on a bad
    download (the file is then removed).  Failures raise :class:`ResolveError`.
    """
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    filename = filename or os.path.basename(urls[0].split("?")[0])
    what = what or filename
    if path is not None:
        return local_file(path, what=what, flag=flag, source=" or ".join(urls))
    for candidate in search_paths:
        c = os.path.expanduser(os.fspath(candidate))
        if os.path.isfile(c):
            return c
    dst = os.path.join(os.path.expanduser(os.fspath(cache_dir)), filename)
    if os.path.isfile(dst):
        return dst

    def error(reason: str) -> ResolveError:
        looked = [os.fspath(s) for s in search_paths] + [dst]
        msg = (f"Could not get the {what} ({filename}): {reason}\n  URL: {' or '.join(urls)}\n"
               f"  Looked for it at: {', '.join(looked)}\n  How to provide it: download it on a machine "
               f"with network access and put it at {dst}")
        msg += f", or pass its path with {flag}." if flag else "."
        if hint:
            msg += f"\n  {hint}"
        return ResolveError(msg, what=what, source=urls[0], url=urls[0], expected=dst, flag=flag)

    if is_offline() or not download:
        raise error("offline mode (HF_HUB_OFFLINE=1) is on and it is not on disk." if is_offline()
                    else "downloads are disabled and it is not on disk.")
    failures = []
    for url in urls:
        try:
            _download_url(url, dst)
            if validate is not None:
                validate(dst)
            return dst
        except Exception as exc:  # network, HTTP 404, validation: try the next source
            failures.append(f"{url}: {_root_cause(exc)}")
            if os.path.isfile(dst) and validate is not None:
                os.unlink(dst)
    raise error("the download failed (" + "; ".join(failures) + ").")


# --------------------------------------------------------------------------------------------
# Released LPD files
# --------------------------------------------------------------------------------------------

def normalize_model_name(model: str) -> str:
    """``"LPD-L"``, ``"lpd_l"``, ``"l"`` -> ``"lpd_l"``."""
    name = model.strip().lower().replace("-", "_")
    if not name.startswith("lpd_"):
        name = "lpd_" + name
    return name


@dataclass(frozen=True)
class CheckpointSource:
    """Where a released checkpoint lives."""

    repo_id: str
    filename: str

    @property
    def url(self) -> str:
        return hf_url(self.repo_id, self.filename)


def checkpoint_source(model: str, img_size: int, filename: str | None = None) -> CheckpointSource:
    """Repository and file name of the released checkpoint of ``model`` at ``img_size`` px."""
    name = normalize_model_name(model)
    key = (name, int(img_size))
    if key not in RELEASED_CHECKPOINTS:
        released = ", ".join(f"{m} at {s}px" for m, s in RELEASED_CHECKPOINTS)
        raise ResolveError(
            f"No released checkpoint for model {model!r} at {img_size} px (released: {released}). "
            f"Pass your own checkpoint with --pretrained_ckpt, or --random_init for random weights.",
            what="checkpoint", flag="--pretrained_ckpt")
    repo = RELEASED_CHECKPOINTS[key]
    return CheckpointSource(repo, filename or CHECKPOINT_FILENAME.format(model=name, img_size=int(img_size)))


def resolve_checkpoint(
    model: str,
    img_size: int,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    filename: str | None = None,
    revision: str | None = None,
    download: bool = True,
) -> str:
    """Local path of an LPD checkpoint: ``path`` (``--pretrained_ckpt``) if given, else the released
    checkpoint of ``model`` (``lpd_l``, ``lpd_xl``, ``lpd_xxl``) at ``img_size`` from the Hub."""
    if path is not None:
        return local_file(path, what="LPD checkpoint", flag="--pretrained_ckpt",
                          hint="Leave out --pretrained_ckpt to use the released checkpoint of --model/--img_size.")
    src = checkpoint_source(model, img_size, filename)
    return hf_file(src.repo_id, src.filename, revision=revision, cache_dir=cache_dir,
                   flag="--pretrained_ckpt", what=f"released {normalize_model_name(model)} {img_size}px checkpoint",
                   download=download, fallback_exts=_CHECKPOINT_EXTS if filename is None else ())


def resolve_vq(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    download: bool = True,
) -> str:
    """Local path of the LlamaGen VQ tokenizer: ``path`` (``--vqgan_path``) if given, else
    ``vq_ds16_c2i.pt`` from ``FoundationVision/LlamaGen``."""
    return hf_file(VQ_REPO, VQ_FILENAME, revision=revision, cache_dir=cache_dir, path=path,
                   flag="--vqgan_path", what="LlamaGen VQ tokenizer", download=download)


def _format_threshold(value: float) -> str:
    v = float(value)
    return str(int(v)) if v.is_integer() else repr(v)


def orders_filename(img_size: int, generation_steps: int, repulsion_threshold: float) -> str:
    """Released order file name, e.g. ``res256_steps20_repulsion2.json``."""
    return ORDERS_FILENAME.format(img_size=int(img_size), steps=int(generation_steps),
                                  threshold=_format_threshold(repulsion_threshold))


def resolve_orders(
    img_size: int,
    generation_steps: int,
    repulsion_threshold: float,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    download: bool = True,
) -> str:
    """Local path of a pre-generated LPD order file: ``path`` (``--lpd_order_file``) if given, else
    ``res{img_size}_steps{steps}_repulsion{threshold}.json`` from ``mit-han-lab/lpd_orders``.

    Released files exist for (256, 20, 2), (256, 20, 3), (256, 32, 2) and (512, 48, 4).  When the
    file cannot be had, orders can instead be generated locally (omit ``--lpd_order_file``).
    """
    name = orders_filename(img_size, generation_steps, repulsion_threshold)
    try:
        return hf_file(ORDERS_REPO, name, revision=revision, cache_dir=cache_dir, path=path,
                       flag="--lpd_order_file", what="pre-generated LPD order file", download=download)
    except ResolveError as exc:
        msg = str(exc) + "\n    - or leave out --lpd_order_file: orders are then generated locally from --seed"
        raise ResolveError(msg, what=exc.what, source=exc.source, url=exc.url, expected=exc.expected,
                           flag=exc.flag) from None


def _validate_stats(path: str) -> None:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path} lacks 'mu'/'sigma' (has {data.files})")


def resolve_fid_stats(
    img_size: int,
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    search_dirs: Sequence[str | os.PathLike] = ("fid_stats",),
    download: bool = True,
) -> str:
    """Local path of the ADM reference statistics ``adm_in{img_size}_stats.npz``.

    ``path`` (``--fid_stats``) wins and must exist.  Otherwise ``<dir>/adm_in{img_size}_stats.npz``
    for each of ``search_dirs`` (relative to the working directory: the released layout
    ``fid_stats/``), then the cache ``cache_dir`` (default ``$LPD_CACHE/fid_stats``), then a download
    from :data:`FID_STATS_SOURCES` (validated to hold ``mu`` and ``sigma``).
    """
    filename = FID_STATS_FILENAME.format(img_size=int(img_size))
    what = f"ADM reference statistics for {img_size}px (FID)"
    if path is not None:
        return local_file(path, what=what, flag="--fid_stats", hint=FID_STATS_HINT)
    urls = FID_STATS_SOURCES.get(int(img_size), ())
    search = [os.path.join(os.fspath(d), filename) for d in search_dirs]
    if not urls:
        for f in search:
            if os.path.isfile(f):
                return f
        raise ResolveError(f"No reference statistics are known for {img_size}px images (looked at "
                           f"{', '.join(search)}). Pass a statistics file with --fid_stats. "
                           f"{FID_STATS_HINT}", what=what, flag="--fid_stats")
    return url_file(urls, cache_dir=cache_dir or lpd_cache_dir("fid_stats"), filename=filename,
                    flag="--fid_stats", what=what, download=download, search_paths=search,
                    hint=FID_STATS_HINT, validate=_validate_stats)
