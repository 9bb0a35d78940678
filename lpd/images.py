"""Images in and out: the ADM centre crop, input images and edit masks, PNGs, the ADM ``.npz`` of a run,
sample grids, uint8 pixels <-> tensors in [-1, 1], and the training ImageFolder. Writes are atomic."""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from lpd.config import check_positive
from lpd.files import atomic_write_bytes

__all__ = ["load_image", "load_mask", "center_crop_arr", "save_grid"]

ImageSource = str | os.PathLike | Image.Image | np.ndarray


class ImageFileError(ValueError):
    """An image file that is missing or cannot be decoded."""


_WIDE_GREYS = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # convert() clips these to 0..255
IMAGE_EXTENSIONS = tuple(".jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp".split())  # torchvision's
SOFTWARE = "lpd"  # the Software text of the PNGs lpd writes
_PNG_INFO = PngImagePlugin.PngInfo()
_PNG_INFO.add_text("Software", SOFTWARE)
MAX_ASPECT_WORK = 16  # ADM's full resize while it holds at most this many output images of pixels


def _adm_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    w, h = (round(x * scale) for x in pil_image.size)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    if w * h > MAX_ASPECT_WORK * image_size**2:  # long and thin: resample the crop only
        sx, sy = pil_image.width / w, pil_image.height / h
        box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
        return np.array(pil_image.resize((image_size, image_size), resample=Image.BICUBIC, box=box))
    arr = np.array(pil_image.resize((w, h), resample=Image.BICUBIC))
    return arr[top : top + image_size, left : left + image_size]


def convert(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as ``mode`` ('RGB', 'L'), 16-bit, 32-bit and float greys scaled to 8 bits (float: 0..1 if at most 1)."""
    if im.mode in _WIDE_GREYS:
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" else 1.0 if a.size and a.max() <= 1 else 255.0
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return im.convert(mode)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve (BOX) while the short side is >= 2 * size, resize (BICUBIC), crop;
    uint8 HWC. An image longer than 16 crops resamples the crop alone (work bounded by the output)."""
    return _adm_crop(convert(pil_image, "RGB"), image_size)


def read_image(path: str | os.PathLike, mode: str = "RGB", what: str = "image") -> Image.Image:
    """The image file ``path`` decoded as ``mode`` (:func:`convert`); ImageFileError names the file."""
    return convert(_pil(path, what), mode)


def _pil(source: ImageSource, what: str, mask: bool = False) -> Image.Image:
    """``source`` decoded (every pixel) as a PIL image; arrays checked (a ``mask`` may be grey or bool)."""
    if isinstance(source, np.ndarray):
        rgb = source.dtype == np.uint8 and source.ndim == 3 and source.shape[2] == 3
        grey = mask and source.ndim == 2 and source.dtype in (np.uint8, np.bool_)
        if not (rgb or grey) or source.size == 0:
            want = "uint8 [H, W, 3]" + (" or bool / uint8 [H, W]" if mask else "")
            raise ValueError(
                f"{what} array must be {want}, got {source.dtype} {list(source.shape)}"
            )
        return Image.fromarray(np.ascontiguousarray(source))
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{what} must be a file path, a PIL image or a numpy array, got {type(source).__name__}"
        )
    path = os.fspath(source)
    try:
        with Image.open(path) as im:
            im.load()  # decodes every pixel: a truncated file fails here
            return im
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageFileError(
            f"{what} file {path!r} cannot be read ({type(e).__name__}: {e}): give an existing, "
            f"undamaged PNG or JPEG"
        ) from None


def load_image(source: ImageSource, img_size: int) -> np.ndarray:
    """uint8 ``[img_size, img_size, 3]``: a path, PIL image or uint8 ``[H, W, 3]`` array, ADM centre-cropped."""
    return _adm_crop(convert(_pil(source, "image"), "RGB"), check_positive(img_size, "img_size"))


def load_mask(
    source: ImageSource, img_size: int | None, image: ImageSource | None = None
) -> np.ndarray:
    """bool ``[img_size, img_size]``, True where white (grey >= 128, or 1 in a 0/1 mask), cropped as
    ``image`` when of its size (any size with ``img_size=None``); an empty mask is refused."""
    im = _pil(source, "mask", mask=True)  # 'L' 0..255; a 0/1 mask (of any depth) as 0/255
    raw = np.asarray(im if im.mode in _WIDE_GREYS else im.convert("L"))
    one = raw.size and raw.max() == 1
    mask = Image.fromarray((raw >= 1).astype(np.uint8) * 255, "L") if one else convert(im, "L")
    if img_size is not None and mask.size != (check_positive(img_size, "img_size"),) * 2:
        got = f"the mask is {mask.height}x{mask.width} (HxW)"
        if image is None:
            raise ValueError(
                f"{got}, not {img_size}x{img_size}: give a mask of the cropped image's size, or "
                f"pass image= (the image it was drawn on) to crop it like the image"
            )
        w, h = _pil(image, "image").size
        if mask.size != (w, h):
            raise ValueError(
                f"{got} but its image is {h}x{w}: a mask must have the image's size or "
                f"{img_size}x{img_size} (the cropped image's)"
            )
        out = _adm_crop(mask, img_size) >= 128
    else:
        out = np.asarray(mask) >= 128
    if not out.any():
        raise ValueError(
            "the mask selects no pixel"
            + (" of the cropped image" if out.shape != mask.size[::-1] else "")
            + ": white (or 1 in a 0/1 mask) marks what to regenerate"
        )
    return out


def image_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` or ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in [-1, 1]."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.dtype != torch.uint8 or x.dim() not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [H, W, 3] or [B, H, W, 3], got {x.dtype} {list(x.shape)}"
        )
    x = x[None] if x.dim() == 3 else x
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output ``[B, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, 3]``, as the released sampling code."""
    x = ((images.float() + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def image_path(image_dir: str | os.PathLike, index: int) -> str:
    """``image_dir/000123.png``."""
    return os.path.join(os.fspath(image_dir), f"{int(index):06d}.png")


def written_by_lpd(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG that lpd wrote (its ``Software`` text), so an lpd command may replace it."""
    try:
        with Image.open(os.fspath(path)) as im:
            return im.format == "PNG" and im.info.get("Software") == SOFTWARE
    except (OSError, ValueError, SyntaxError):
        return False


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W, 3]`` image as PNG (no fsync: a damaged file fails the next run's check)."""
    img = Image.fromarray(np.ascontiguousarray(image), "RGB")
    atomic_write_bytes(path, lambda f: img.save(f, format="PNG", pnginfo=_PNG_INFO), fsync=False)


def read_png(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """uint8 ``[H, W, 3]`` pixels of an RGB PNG of ``size`` (H, W); None if missing, unreadable or of another kind."""
    try:
        with Image.open(os.fspath(path)) as im:
            if im.format != "PNG" or im.mode != "RGB":
                return None
            arr = np.asarray(im)  # decodes every pixel: a truncated file fails here
    except (OSError, ValueError, SyntaxError):
        return None
    return arr if size is None or tuple(arr.shape[:2]) == tuple(size) else None


def write_npz(path: str | os.PathLike, image_paths: Sequence[str], size: tuple[int, int]) -> None:
    """Pack PNGs into an ADM ``.npz`` (``arr_0``: uint8 ``[N, H, W, 3]``), streamed one image at a time."""
    shape = (len(image_paths), int(size[0]), int(size[1]), 3)
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, header)
                for p in image_paths:
                    arr = read_png(p, size)
                    if arr is None:
                        raise ImageFileError(
                            f"cannot pack {p!r} into {os.fspath(path)!r}: missing or unreadable PNG"
                        )
                    out.write(arr.tobytes())

    atomic_write_bytes(path, write)


def save_grid(
    path: str | os.PathLike,
    images: Sequence[np.ndarray],
    ncol: int = 8,
    max_tile: int = 256,
    gutter: int = 2,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> None:
    """One PNG grid: tiles of at most ``max_tile`` px, ``gutter`` px apart, labelled."""
    if len(images) == 0:
        raise ValueError("save_grid needs at least one image")
    (h, w), ncol = images[0].shape[:2], min(ncol, len(images))
    nrow = math.ceil(len(images) / ncol)
    for labels, want, what in ((row_labels, nrow, "rows"), (col_labels, ncol, "columns")):
        if labels is not None and len(labels) != want:
            raise ValueError(f"save_grid: {len(labels)} labels for {want} {what}")
    scale = min(1.0, max_tile / max(h, w))
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    try:
        font = ImageFont.load_default(size=max(10, min(th, tw) // 16))
    except (TypeError, ImportError, OSError):  # no FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox
    pad = max(2, gutter)
    left = max(measure((0, 0), t, font=font)[2] for t in row_labels) + 2 * pad if row_labels else 0
    top = max(measure((0, 0), t, font=font)[3] for t in col_labels) + 2 * pad if col_labels else 0
    size = (left + ncol * (tw + gutter) - gutter, top + nrow * (th + gutter) - gutter)
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, arr in enumerate(images):
        tile = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        x, y = left + (k % ncol) * (tw + gutter), top + (k // ncol) * (th + gutter)
        canvas.paste(tile if (th, tw) == (h, w) else tile.resize((tw, th), Image.BICUBIC), (x, y))
    for r, text in enumerate(row_labels or ()):
        box = measure((0, 0), text, font=font)
        y = top + r * (th + gutter) + (th - box[3] - box[1]) // 2
        draw.text((pad, y), text, fill=(0, 0, 0), font=font)
    for c, text in enumerate(col_labels or ()):
        x = left + c * (tw + gutter) + (tw - measure((0, 0), text, font=font)[2]) // 2
        draw.text((x, pad), text, fill=(0, 0, 0), font=font)
    atomic_write_bytes(path, lambda f: canvas.save(f, format="PNG", pnginfo=_PNG_INFO))


class DataError(RuntimeError):
    """A training file that cannot be read. Raised in a DataLoader worker, it keeps its one-line
    message (torch re-raises it as ``type(e)("Caught ...<traceback>...Class: message")``)."""

    def __init__(self, message: str = "") -> None:
        head = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and head in message:
            message = message.rsplit(head, 1)[1].strip()
        super().__init__(message)


class CacheError(DataError):
    """A token cache that cannot be read, is incomplete, or does not fit the model or the run."""


def resolve_image_root(data_path: str) -> str:
    """``data_path/train`` when it exists (the released ``--data_path IMAGENET``), else ``data_path``."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(
            f"--data_path {data_path!r} is not a folder; give an ImageFolder (class sub-folders of images)"
        )
    train = os.path.join(data_path, "train")
    return train if os.path.isdir(train) else data_path


def visible(name: str) -> bool:
    """Whether a file or folder name counts (hidden ones never do)."""
    return not name.startswith(".")  # .ipynb_checkpoints, .DS_Store, ._x.jpg: never classes/images


def walk_once(top: str, seen: set[str]) -> list[tuple[str, list[str]]]:
    """``(folder, sorted visible files)`` under ``top``, sorted; each real folder once."""
    found = []
    for root, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        dirs[:] = [] if real in seen else sorted(filter(visible, dirs))
        if real not in seen:
            seen.add(real)
            found.append((root, sorted(filter(visible, files))))
    return sorted(found)


class ImageFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder with the ADM crop, ``(float32 [3, S, S] in [-1, 1], label)``;
    hidden names skipped, linked folders read once, images read by their mode."""

    def __init__(self, root: str, img_size: int) -> None:
        self.root, self.img_size, self.loader = root, img_size, read_image
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and visible(e.name))
        if not classes:
            raise FileNotFoundError(
                f"--data_path {root!r} holds no class folders (class sub-folders of images)"
            )
        self.classes, seen = classes, set()
        self.samples = [
            (os.path.join(folder, name), label)
            for label, c in enumerate(classes)
            for folder, files in walk_once(os.path.join(root, c), seen)
            for name in files
            if name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        labels = {t for _, t in self.samples}
        if empty := [c for t, c in enumerate(classes) if t not in labels]:
            raise FileNotFoundError(
                f"class folder(s) {', '.join(empty[:5])} of {root!r} hold no images "
                f"({', '.join(IMAGE_EXTENSIONS)}), or only folders already read through a link"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise DataError(
                f"image {path!r} cannot be decoded ({type(e).__name__}: {e}); remove or replace it "
                f"and rerun"
            ) from e
        return image_to_tensor(center_crop_arr(image, self.img_size))[0], label


def image_folder(data_path: str, img_size: int) -> ImageFolder:
    """The :class:`ImageFolder` of ``data_path`` (or of its ``train/``)."""
    return ImageFolder(resolve_image_root(data_path), img_size)
