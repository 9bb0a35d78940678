"""The page: Generate (the image builds up step by step beside its order), Edit (paint the region to
regenerate) and Orders. Every handler checks its inputs; a bad one gets a message in the page."""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Iterator
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from lpd.app.model import AppModel, decode_steps, render_partial
from lpd.editing import edit_images, token_keep
from lpd.files import atomic_write_bytes
from lpd.images import ImageFileError, load_mask, write_png
from lpd.orders.source import OrderSource
from lpd.orders.stats import order_statistics
from lpd.orders.visualize import render_order
from lpd.sampling import ORDERS, decode_tokens
from lpd.schedules import group_sizes
from lpd.text.prompts import encode_ids

__all__ = ["Studio", "bound_uploads", "build_blocks"]

MAX_FRAMES = 32  # streamed frames per generation (every k-th step beyond)
MAX_VARIANTS = 8
MAX_SEED = 2**31 - 1
ORDER_SIZES = (128, 256, 512, 1024)
IMAGE_HEIGHT = 330  # pixels: a 256 px image below the label
DEVICE_QUEUE = "device"  # generation and editing share one slot per device


def _whole(value: Any, name: str, low: int, high: int) -> int:
    if (
        value is None
        or isinstance(value, bool)
        or not float(value).is_integer()
        or not low <= value <= high
    ):
        raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(value)


def _number(value: Any, name: str, low: float, high: float) -> float:
    if (
        value is None
        or isinstance(value, bool)
        or not math.isfinite(float(value))
        or not low <= value <= high
    ):
        raise gr.Error(f"{name} must be a number from {low} to {high}, got {value}")
    return float(value)


def bound_uploads(editor: gr.ImageEditor, max_pixels: int) -> gr.ImageEditor:
    """Make ``editor`` refuse, with a message, uploads that are no image or have more than
    ``max_pixels`` pixels (before decoding them); on the instance: a subclass writes a stub file."""
    convert = editor.convert_and_format_image

    def checked(file: Any, flatten_on_white: bool = False) -> Any:
        if file is None:
            return None
        try:
            with Image.open(file.path if hasattr(file, "path") else io.BytesIO(file)) as im:
                size = im.size  # the header only
            if size[0] * size[1] <= max_pixels:
                return convert(file, flatten_on_white)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise gr.Error(
                f"the upload is not a readable image ({type(e).__name__}); upload a PNG or JPEG"
            ) from None
        raise gr.Error(
            f"the image is {size[0]}x{size[1]} pixels; at most {max_pixels:,} are accepted"
        )

    editor.convert_and_format_image = checked
    return editor


class Studio:
    """The page's handlers for one model; they write files to ``workdir`` (served)."""

    def __init__(self, app: AppModel, workdir: str) -> None:
        self.app, self.workdir = app, workdir
        self.samples = self._write_samples()

    def _label(self, class_name: Any, prompt: Any) -> int | tuple:
        """The class index, or a text model's caption ``(features, mask)`` of ``prompt``."""
        encoder = self.app.text_encoder
        if encoder is None:
            if class_name not in self.app.class_names:
                raise gr.Error(f"pick a class from the list (got {str(class_name)[:40]!r})")
            return self.app.class_names.index(class_name)
        if not isinstance(prompt, str) or not prompt.strip():
            raise gr.Error("type a prompt: this model draws what a text describes")
        ids, too_long = encoder.token_ids([prompt])
        if too_long:
            raise gr.Error(
                f"the prompt is longer than the {encoder.max_text_tokens} text tokens the model "
                "reads; shorten it"
            )
        return encode_ids(encoder, *encoder.pad(ids))

    def _sampling(self, **settings: Any):
        try:
            return self.app.sampling(**settings)
        except ValueError as e:
            raise gr.Error(str(e).replace("--", "")) from None

    def _folder(self) -> str:
        path = os.path.join(self.workdir, "out", uuid.uuid4().hex)
        os.makedirs(path)
        return path

    def generate(
        self,
        class_name: str,
        prompt: str,
        steps: float,
        cfg: float,
        tau_r: float,
        order: str,
        seed: float,
    ) -> Iterator[tuple]:
        """Frames ``(image, order heat map, files, status, final image)``; the last with files."""
        app, g = self.app, self.app.model.grid_size
        n = g * g
        label = self._label(class_name, prompt)
        steps, seed = _whole(steps, "steps", 1, n), _whole(seed, "seed", 0, MAX_SEED)
        tau_r = _number(tau_r, "τr", 0.0, float(g))
        if order not in ORDERS:
            raise gr.Error(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        sampling = self._sampling(
            cfg=_number(cfg, "cfg", 0.0, 50.0), repulsion_threshold=tau_r, order=order
        )
        sizes = group_sizes(app.model.img_size, steps)
        row = OrderSource(order, sizes, g, seed=seed, repulsion_threshold=tau_r).rows([0])[0]
        heat = np.asarray(
            render_order(row, sizes, g, steps_shown=0, title=f"{order} order, {steps} steps")
        )
        every, tokens = math.ceil(steps / MAX_FRAMES), None
        try:
            for k, tokens in decode_steps(app, label, row, sizes, sampling, seed):
                if k + 1 < steps and k % every == 0:
                    done = int((tokens >= 0).sum())
                    status = f"step {k + 1} of {steps}: {done} of {n} tokens"
                    yield render_partial(app, tokens), heat, None, status, None
        except TimeoutError as e:
            raise gr.Error(str(e)) from None
        image = decode_tokens(app.tokenizer, tokens, sampling)[0]
        text = isinstance(label, tuple)
        condition = {"prompt": prompt} if text else {"class": class_name, "label": label}
        settings = {
            "model": app.name,
            **condition,
            "steps": steps,
            "seed": seed,
            "group_sizes": sizes,
            "sampling": sampling.to_dict(),
            "order": row.tolist(),
        }
        folder = self._folder()
        png, js = (
            os.path.join(folder, f"lpd_{'prompt' if text else label}_seed{seed}.png"),
            os.path.join(folder, "settings.json"),
        )
        write_png(png, image)
        atomic_write_bytes(js, lambda f: f.write(json.dumps(settings, indent=1).encode()))
        yield image, heat, [png, js], f"done: {steps} steps, {n} tokens", image

    def edit(
        self,
        editor: dict | None,
        class_name: str,
        prompt: str,
        steps: float,
        num: float,
        seed: float,
    ) -> tuple:
        """``(source, masked source, edits)``: the painted region regenerated."""
        app = self.app
        if not editor or editor.get("background") is None:
            raise gr.Error("upload an image or pick a sample first")
        label = self._label(class_name, prompt)
        num, seed = _whole(num, "variants", 1, MAX_VARIANTS), _whole(seed, "seed", 0, MAX_SEED)
        background = np.asarray(editor["background"])
        image = np.ascontiguousarray(
            background[..., :3] if background.ndim == 3 else np.stack([background] * 3, -1)
        )
        mask = np.zeros(image.shape[:2], dtype=bool)
        for layer in editor.get("layers") or []:
            layer = np.asarray(layer)
            painted = (
                layer[..., 3] > 0
                if layer.ndim == 3 and layer.shape[2] == 4
                else np.asarray(layer).any(-1)
            )
            if painted.shape != mask.shape:
                painted = np.asarray(
                    Image.fromarray(painted).resize(mask.shape[::-1], Image.NEAREST)
                )
            mask |= painted
        if not mask.any():
            raise gr.Error("paint the region to regenerate with the brush first")
        try:
            keep = token_keep(load_mask(mask, app.model.img_size, image=image), app.patch)
        except (ValueError, ImageFileError) as e:
            raise gr.Error(str(e)) from None
        unknown = int((~keep).sum())
        steps = _whole(
            steps, f"steps (at most the {unknown} tokens under the painted region)", 1, unknown
        )
        try:
            out = edit_images(
                app.model,
                app.tokenizer,
                image,
                mask,
                label,
                num=num,
                steps=steps,
                seed=seed,
                sampling=app.sampling(),
            )
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return out["source"], out["masked"], list(out["edits"])

    def orders(
        self, img_size: float, steps: float, tau_r: float, seed: float
    ) -> tuple[np.ndarray, str]:
        """The locality-aware order of image 0 of a ``seed`` run, step by step, with statistics."""
        if img_size not in ORDER_SIZES:
            raise gr.Error(f"resolution must be one of {ORDER_SIZES}, got {img_size}")
        grid = int(img_size) // 16
        steps, seed = _whole(steps, "steps", 1, grid * grid), _whole(seed, "seed", 0, MAX_SEED)
        tau_r = _number(tau_r, "τr", 0.0, float(grid))
        sizes = group_sizes(int(img_size), steps)
        row = OrderSource("lpd", sizes, grid, seed=seed, repulsion_threshold=tau_r).rows([0])[0]
        picture = render_order(row, sizes, grid, steps_shown=min(steps, MAX_FRAMES))
        stats = order_statistics(row[None], sizes, grid, tau_r)
        text = (
            f"**{grid}x{grid} tokens in {steps} steps**, group sizes {sizes[:12]}"
            f"{' ...' if steps > 12 else ''}\n\n"
            + "\n".join(f"* {k.replace('_', ' ')}: {v:.3f}" for k, v in stats.items())
        )
        return np.asarray(picture), text

    def _write_samples(self) -> list[str]:
        """Held-out digits (one per class) as PNGs for the editor, when the model draws digits."""
        if getattr(self.app.tokenizer, "levels", None) is None or len(self.app.class_names) != 10:
            return []
        from lpd.demo.digits import load_digits_dataset

        tokens, labels = load_digits_dataset(
            "test", self.app.model.grid_size, int(self.app.tokenizer.levels)
        )
        first = [int(np.flatnonzero(labels.numpy() == d)[0]) for d in range(10)]
        pixels = decode_tokens(
            self.app.tokenizer, tokens[first].flatten(1).to(self.app.device), self.app.sampling()
        )
        paths = [os.path.join(self.workdir, "samples", f"digit_{d}.png") for d in range(10)]
        for path, im in zip(paths, pixels):
            write_png(path, im)
        return paths


def _shown(label: str, elem_id: str | None = None) -> gr.Image:
    """An output image of the page (PNG, not editable)."""
    return gr.Image(
        label=label, format="png", interactive=False, height=IMAGE_HEIGHT, elem_id=elem_id
    )


def build_blocks(studio: Studio, max_pixels: int) -> gr.Blocks:
    """The three tabs; generation and editing queue for one device slot (places shown)."""
    app = studio.app
    g, text = app.model.grid_size, app.condition == "text"
    first = app.class_names[0] if app.class_names else None
    n = g * g
    device = dict(concurrency_id=DEVICE_QUEUE, concurrency_limit=1)
    with gr.Blocks(
        title="LPD: locality-aware parallel decoding", delete_cache=(900, 3600)
    ) as blocks:
        gr.Markdown(
            f"## Locality-aware parallel decoding\n**{app.name}**: {app.model.img_size} px, "
            f"{g}x{g} tokens, {'text prompts' if text else f'{len(app.class_names)} classes'}, "
            f"on {app.device.type}"
        )
        last = gr.State(None)
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    cls = gr.Dropdown(app.class_names, value=first, label="class", visible=not text)
                    prompt = gr.Textbox(label="prompt", visible=text)
                    steps = gr.Slider(1, n, value=min(20, n), step=1, label="steps")
                    cfg = gr.Slider(
                        1.0, 15.0, value=app.cfg, step=0.1, label="cfg (classifier-free guidance)"
                    )
                    tau = gr.Slider(
                        0.0,
                        float(g),
                        value=app.repulsion_threshold,
                        step=0.5,
                        label="τr (repulsion threshold)",
                    )
                    order = gr.Radio(list(ORDERS), value="lpd", label="order")
                    seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                    go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                with gr.Column(scale=2):
                    with gr.Row():
                        image = _shown("image (grey: not decoded yet)", "gen-image")
                        heat = _shown("order: decoding step of each token")
                    status = gr.Markdown(elem_id="gen-status")
                    files = gr.File(
                        label="download: image and settings",
                        file_count="multiple",
                        interactive=False,
                    )
            go.click(
                studio.generate,
                [cls, prompt, steps, cfg, tau, order, seed],
                [image, heat, files, status, last],
                api_name="generate",
                **device,
            )
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    editor = gr.ImageEditor(
                        label="image: paint the region to regenerate",
                        type="numpy",
                        sources=("upload", "clipboard"),
                        transforms=(),
                        layers=False,
                        brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                        elem_id="editor",
                    )
                    bound_uploads(editor, max_pixels)
                    if studio.samples:
                        gr.Examples(
                            [[p] for p in studio.samples],
                            [editor],
                            label="samples: held-out digits",
                        )
                    use = gr.Button("Use the generated image")
                    e_cls = gr.Dropdown(
                        app.class_names, value=first, label="class", visible=not text
                    )
                    e_prompt = gr.Textbox(label="prompt", visible=text)
                    e_steps = gr.Slider(1, n, value=min(8, n), step=1, label="steps")
                    e_num = gr.Slider(1, MAX_VARIANTS, value=4, step=1, label="variants")
                    e_seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                    e_go = gr.Button("Edit", variant="primary", elem_id="edit-btn")
                with gr.Column(scale=2):
                    with gr.Row():
                        source = _shown("source")
                        masked = _shown("masked source", "masked")
                    edits = gr.Gallery(label="edits", format="png", columns=4, elem_id="edits")
            use.click(_to_editor, last, editor, api_name=False)
            e_go.click(
                studio.edit,
                [editor, e_cls, e_prompt, e_steps, e_num, e_seed],
                [source, masked, edits],
                api_name="edit",
                **device,
            )
        with gr.Tab("Orders"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    o_size = gr.Dropdown(
                        list(ORDER_SIZES),
                        value=app.model.img_size if app.model.img_size in ORDER_SIZES else 256,
                        label="resolution (px; 16 px per token)",
                    )
                    o_steps = gr.Number(20, precision=0, minimum=1, maximum=4096, label="steps")
                    o_tau = gr.Slider(
                        0.0, 16.0, value=2.0, step=0.5, label="τr (repulsion threshold)"
                    )
                    o_seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                    o_go = gr.Button("Draw the order", variant="primary", elem_id="orders-btn")
                with gr.Column(scale=2):
                    picture = gr.Image(
                        show_label=False,
                        format="png",
                        interactive=False,
                    )
                    stats = gr.Markdown()
            o_go.click(
                studio.orders,
                [o_size, o_steps, o_tau, o_seed],
                [picture, stats],
                api_name="orders",
                concurrency_id="orders",
                concurrency_limit=2,
            )
    return blocks


def _to_editor(image: np.ndarray | None) -> dict:
    if image is None:
        raise gr.Error("generate an image on the Generate tab first")
    return {"background": image, "layers": [], "composite": image}
