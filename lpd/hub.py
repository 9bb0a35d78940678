"""Resolve released files (LPD checkpoints, the VQ tokenizer, FID statistics) to local paths.

A path given by the user wins. Hub files come from huggingface_hub's cache (tried without network first),
URL files from $LPD_CACHE (default ~/.cache/lpd); HF_HUB_OFFLINE=1 forbids downloads.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence

import huggingface_hub
import numpy as np
import torch.hub
from huggingface_hub import constants, errors

from lpd.files import EXPORT_CONFIG, EXPORT_WEIGHTS

_Path = str | os.PathLike

RELEASED_CHECKPOINTS: dict[tuple[str, int], str] = {  # Hub repositories
    (m, s): f"mit-han-lab/{m}_{s}"
    for s, models in ((256, ("lpd_l", "lpd_xl", "lpd_xxl")), (512, ("lpd_l", "lpd_xl")))
    for m in models
}
CHECKPOINT_FILENAME = "{model}_{img_size}.pth"  # as loaded by the released evaluation scripts
_CKPT = "--pretrained_ckpt"
_CHECKPOINT_EXTS = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
VQ_REPO, VQ_FILENAME = "FoundationVision/LlamaGen", "vq_ds16_c2i.pt"
VQ_FILENAMES = (VQ_FILENAME, "vq_ds16_t2i.pt")  # its VQ-16 for class / text models (one design)
FID_STATS_FILENAME = "adm_in{img_size}_stats.npz"
_MAR_RAW = "https://github.com/LTH14/mar/raw/main/fid_stats"
_LPD_RAW = "https://github.com/mit-han-lab/lpd/raw/main/fid_stats"
FID_STATS_SOURCES: dict[int, tuple[str, ...]] = {
    256: (f"{_MAR_RAW}/adm_in256_stats.npz", f"{_LPD_RAW}/adm_in256_stats.npz"),
    512: (f"{_LPD_RAW}/adm_in512_stats.npz",),
}
_ADM = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
ADM_REFERENCE_BATCHES = {  # OpenAI's ADM reference images (arr_0)
    256: f"{_ADM}/256/VIRTUAL_imagenet256_labeled.npz",
    512: f"{_ADM}/512/VIRTUAL_imagenet512.npz",
}
FID_STATS_HINT = (
    "The ADM ImageNet reference statistics (mu (2048,), sigma (2048, 2048) of Inception pool features) are kept "
    "as fid_stats/adm_in256_stats.npz in https://github.com/LTH14/mar and read from fid_stats/ by the released LPD "
    "code (https://github.com/mit-han-lab/lpd); a third-party mirror of both resolutions is "
    "https://huggingface.co/sinaalemohammad/Neon. They can also be computed from OpenAI's ADM reference batches ("
    + " and ".join(ADM_REFERENCE_BATCHES.values())
    + ") with `python -m lpd.metrics stats --input "
    "VIRTUAL_imagenet512.npz --output adm_in512_stats.npz` (any reference images work the same way)."
)


class ResolveError(FileNotFoundError):
    """A file could not be found or fetched; str() is the message, which says how to provide it."""


def export_folder(path: str) -> str | None:
    """The folder of an export: ``path``, or the cached files of the Hub repository ``path``; else None."""
    if os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
        return path
    if os.path.exists(path) or path.endswith(_CHECKPOINT_EXTS[:-1]):  # not .safetensors
        return None
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return None
    hint = f"or, if {path} was meant as a folder on this machine: it does not exist"
    for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
        local = hub_file(path, name, what="exported LPD model", flag=_CKPT, hint=hint)
    return os.path.dirname(local)


def resolve_user_checkpoint(path: _Path) -> str:
    """What --pretrained_ckpt names: a file, a sharded or exported folder, an export repository."""
    path = export_folder(os.fspath(path)) or os.fspath(path)
    return path if os.path.isdir(path) else local_file(path, what="LPD checkpoint", flag=_CKPT)


def resolve_model_files(
    model: str | None,
    img_size: int,
    *,
    checkpoint: _Path | None = None,
    released: bool = True,
    vqgan_path: _Path | None = None,
    vq: bool = True,
    more: Mapping[str, Callable[[], str]] | None = None,
) -> dict[str, str]:
    """The paths, by name, of "checkpoint" (``checkpoint``, else the released one of ``model`` if
    ``released``), "VQ tokenizer" (``vqgan_path`` or the released one, if ``vq``) and ``more``
    (name -> resolver); the failures of all of them in one ResolveError, with a download hint."""
    need: dict[str, Callable[[], str]] = {}
    if checkpoint is not None:
        need["checkpoint"] = lambda: resolve_user_checkpoint(checkpoint)
    elif released:
        need["checkpoint"] = lambda: resolve_checkpoint(model, img_size)
    if vq:
        need["VQ tokenizer"] = lambda: resolve_vq(vqgan_path)
    paths, failed = {}, {}
    for name, resolve in {**need, **(more or {})}.items():
        try:
            paths[name] = resolve()
        except ResolveError as e:
            failed[name] = str(e)
    hint = (
        f"On a machine with network access, `python -m lpd.download {model} {img_size}` "
        f"fetches all of them (`--list` prints the commands); HF_HUB_OFFLINE=1 then skips "
        f"every network call."
    )
    if (model, img_size) not in RELEASED_CHECKPOINTS:
        hint = ""
    if len(failed) > 1:
        each = "\n".join(f"({k}) {m}" for k, m in enumerate(failed.values(), 1))
        missing = f"{len(failed)} files are missing ({', '.join(failed)}):\n{each}"
        raise ResolveError(missing + (f"\n{hint}" if hint else ""))
    if failed:
        raise ResolveError(next(iter(failed.values())) + (f"\n  {hint}" if hint else ""))
    return paths


def fid_stats_dir() -> str:
    """Where downloaded ADM statistics are kept: ``$LPD_CACHE/fid_stats`` (``~/.cache/lpd``)."""
    cache = os.environ.get("LPD_CACHE") or "~/.cache/lpd"
    return os.path.join(os.path.expanduser(cache), "fid_stats")


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set now."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").lower()
    return constants.HF_HUB_OFFLINE or flag in ("1", "true", "yes", "on")


def cause(exc: BaseException) -> str:
    """The innermost cause of ``exc``, on one line."""
    for _ in range(32):  # bounded: a chain set by hand may loop
        exc = exc.__cause__ or exc.__context__ or exc
    return f"{type(exc).__name__}: {str(exc).strip().partition(chr(10))[0]}".rstrip(": ")


def local_file(path: _Path, *, what: str = "file", flag: str | None = None, hint: str = "") -> str:
    """``path`` if it is an existing file, else a ResolveError naming ``flag``."""
    p = os.path.expanduser(os.fspath(path))
    if os.path.isfile(p):
        return p
    reason = "is a directory, not a file" if os.path.isdir(p) else "does not exist"
    raise ResolveError(
        f"The {what} given{f' with {flag}' if flag else ''} ({p}) {reason}."
        + (f"\n  {hint}" if hint else "")
    )


_HUB_FAILURES = (  # first match wins: GatedRepoError is a RepositoryNotFoundError
    (
        errors.GatedRepoError,
        "the repository is gated; accept its terms on huggingface.co and log in (`hf auth login`)",
    ),
    (errors.RepositoryNotFoundError, "the repository does not exist or is private"),
    (errors.RemoteEntryNotFoundError, "the repository has no file {filename}"),
    (
        errors.LocalEntryNotFoundError,
        "the Hub could not be reached and the file is not in the cache {cache}",
    ),
    (Exception, "the download failed"),
)


def hub_file(
    repo_id: str,
    filename: str,
    *,
    what: str,
    flag: str,
    cache_dir: _Path | None = None,
    hint: str = "",
    fallback: bool = False,
) -> str:
    """Local path of ``filename`` in the Hub model repository ``repo_id``: the cache, else a
    download; ``fallback``: the repository's only checkpoint file under another name will do."""
    # HF_HUB_CACHE is read now so that a changed environment counts; the default is huggingface_hub's.
    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    cache = os.path.expanduser(os.fspath(cache))

    get = functools.partial(huggingface_hub.hf_hub_download, repo_id, cache_dir=cache)

    def single_other(local: bool) -> str | None:
        names = _repo_files(repo_id, cache, local) if fallback else []
        picks = [n for n in names if n.endswith(_CHECKPOINT_EXTS) and n != filename]
        if len(picks) != 1:
            return None
        where = "found in the cache" if local else "listed on the Hub"
        msg = f"{repo_id} has no {filename}; using its only checkpoint file {picks[0]} ({where})"
        warnings.warn(msg, stacklevel=3)
        return picks[0]

    with contextlib.suppress(OSError, ValueError):
        return get(filename, local_files_only=True)
    if offline():
        if alt := single_other(local=True):
            return get(alt, local_files_only=True)
        reason = f"offline mode (HF_HUB_OFFLINE=1) is on and the file is not in the cache {cache}."
    else:
        try:
            return get(filename, local_files_only=False)
        # HTTP, connection (httpx errors are not OSErrors), disk: reported with the cause
        except Exception as exc:
            missing = isinstance(exc, errors.RemoteEntryNotFoundError)
            if missing and (alt := single_other(local=False)):
                return hub_file(repo_id, alt, what=what, flag=flag, cache_dir=cache, hint=hint)
            reason = next(r for t, r in _HUB_FAILURES if isinstance(exc, t))
            reason = reason.format(filename=filename, cache=cache) + f" ({cause(exc)})."
    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    raise ResolveError(
        f"Could not get the {what} ({filename}) from the Hugging Face Hub repository {repo_id}: {reason}\n"
        f"  URL: {url}\n  How to provide it:\n    - download {url} on a machine with network access and pass its "
        f"path: {flag} /path/to/{os.path.basename(filename)}\n    - or fill the Hugging Face cache with `hf download "
        f"{repo_id} {filename}` (this machine's cache: {cache}; HF_HUB_CACHE / HF_HOME choose another) and copy the "
        f"cache folder here; it is used without network access"
        + (f"\n    - {hint}" if hint else "")
    )


def _repo_files(repo_id: str, cache: str, local: bool) -> list[str]:
    """Files of the model repository ``repo_id`` in the Hub cache (``local``) or on the Hub; [] if unreadable."""
    try:
        if not local:
            return list(huggingface_hub.list_repo_files(repo_id))
        repos = huggingface_hub.scan_cache_dir(cache).repos
    except Exception:  # best effort: the caller then reports the file it expected
        return []
    repos = [r for r in repos if r.repo_id == repo_id and r.repo_type == "model"]
    revs = [v for r in repos for v in r.revisions]
    return sorted({str(f.file_path.relative_to(v.snapshot_path)) for v in revs for f in v.files})


def _download_url(url: str, path: str) -> None:
    torch.hub.download_url_to_file(url, path, progress=True)


def url_file(
    urls: str | Sequence[str],
    *,
    cache_dir: _Path,
    filename: str | None = None,
    path: _Path | None = None,
    flag: str | None = None,
    what: str | None = None,
    download: bool = True,
    search_paths: Sequence[_Path] = (),
    hint: str = "",
    validate: Callable[[str], None] | None = None,
) -> str:
    """Local path of a file published at ``urls``: ``path``, ``search_paths``, ``cache_dir``, else a download."""
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    filename = filename or os.path.basename(urls[0].split("?")[0])
    what = what or filename
    if path is not None:
        hint = f"It is published at {' or '.join(urls)}. {hint}".strip()
        return local_file(path, what=what, flag=flag, hint=hint)
    dst = os.path.join(os.path.expanduser(os.fspath(cache_dir)), filename)
    looked = [os.path.expanduser(os.fspath(p)) for p in search_paths] + [dst]
    if found := next((p for p in looked if os.path.isfile(p)), None):
        return found
    if offline() or not download:
        why = "offline mode (HF_HUB_OFFLINE=1) is on" if offline() else "downloads are disabled"
        reason = why + " and it is not on disk."
    else:
        folder, failures = os.path.dirname(dst), []
        os.makedirs(folder, exist_ok=True)
        for url in urls:  # each to a temporary file, checked, then renamed: dst is never partial
            fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=f"-{filename}", dir=folder)
            os.close(fd)
            try:
                _download_url(url, tmp)
                if validate is not None:
                    validate(tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dst)
                return dst
            except Exception as exc:  # network, HTTP status, validation: try the next source
                failures.append(f"{url}: {cause(exc)}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        reason = "the download failed (" + "; ".join(failures) + ")."
    raise ResolveError(
        f"Could not get the {what} ({filename}): {reason}\n  URL: {' or '.join(urls)}\n"
        f"  Looked for it at: {', '.join(looked)}\n  How to provide it: download it on a machine with "
        f"network access and put it at {dst}"
        + (f", or pass its path with {flag}." if flag else ".")
        + (f"\n  {hint}" if hint else "")
    )


def resolve_checkpoint(
    model: str, img_size: int, path: _Path | None = None, cache_dir: _Path | None = None
) -> str:
    """Local path of an LPD checkpoint: ``path`` (--pretrained_ckpt), else the released one of ``model``."""
    flag, what = _CKPT, f"released {model} {img_size}px checkpoint"
    if path is not None:
        hint = "Leave out --pretrained_ckpt to use the released checkpoint of --model/--img_size."
        return local_file(path, what="LPD checkpoint", flag=flag, hint=hint)
    if (repo := RELEASED_CHECKPOINTS.get((model, int(img_size)))) is None:
        released = ", ".join(f"{m} at {s}px" for m, s in RELEASED_CHECKPOINTS)
        raise ResolveError(
            f"No released checkpoint for model {model!r} at {img_size} px (released: {released}). "
            f"Pass your own checkpoint with {flag}, or --random_init for random weights."
        )
    name = CHECKPOINT_FILENAME.format(model=model, img_size=int(img_size))
    return hub_file(repo, name, flag=flag, what=what, cache_dir=cache_dir, fallback=True)


def resolve_vq(path: _Path | None = None, cache_dir: _Path | None = None) -> str:
    """Local path of the LlamaGen VQ tokenizer: ``path`` (--vqgan_path), else the released one; the
    name of a released file (``vq_ds16_t2i.pt``) that is no local file comes from the Hub too."""
    name, what, flag = os.fspath(path or VQ_FILENAME), "LlamaGen VQ tokenizer", "--vqgan_path"
    if path is not None and (name not in VQ_FILENAMES or os.path.exists(name)):
        return local_file(path, what=what, flag=flag)
    return hub_file(VQ_REPO, name, what=what, flag=flag, cache_dir=cache_dir)


def _validate_stats(path: str) -> None:
    with np.load(path, allow_pickle=False) as data:
        if not {"mu", "sigma"} <= set(data.files):
            raise ValueError(f"not FID statistics: holds {data.files}, not mu and sigma")


def resolve_fid_stats(
    img_size: int, path: _Path | None = None, *, cache_dir: _Path | None = None
) -> str:
    """Local path of ``adm_in{img_size}_stats.npz``: ``path``, ./fid_stats/ (the released layout), the
    cache, else a download."""
    filename = FID_STATS_FILENAME.format(img_size=int(img_size))
    what, flag = f"ADM reference statistics for {img_size}px (FID)", "--fid_stats"
    if path is not None:
        return local_file(path, what=what, flag=flag, hint=FID_STATS_HINT)
    if (urls := FID_STATS_SOURCES.get(int(img_size))) is None:
        raise ResolveError(
            f"No reference statistics are known for {img_size}px images; pass a statistics file "
            f"with {flag}. {FID_STATS_HINT}"
        )
    cache, search = cache_dir or fid_stats_dir(), [os.path.join("fid_stats", filename)]
    kw = {"flag": flag, "what": what, "hint": FID_STATS_HINT, "validate": _validate_stats}
    return url_file(urls, cache_dir=cache, filename=filename, search_paths=search, **kw)
