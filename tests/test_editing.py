"""Zero-shot editing: known tokens come back exactly, the prefill equals the training pass, the
locality-aware order starts at the known region, pixels in / pixels out, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lpd.editing import (
    edit_images,
    edit_tokens,
    editing_logits,
    prefill_layout,
    region_mask,
    token_keep,
)
from lpd.images import image_to_tensor
from lpd.models import build_lpd
from lpd.orders import lpd_orders
from lpd.sampling import SamplingConfig, decode_tokens, sample_tokens
from lpd.tokenizer import make_tokenizer

N = 16  # a 4x4 token grid (64 px)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_lpd(
        img_size=64, embed_dim=32, depth=2, num_heads=4, vocab_size=24, class_num=5
    ).eval()


def masks() -> np.ndarray:
    rng = np.random.RandomState(0)
    holes = rng.rand(N) < 0.5
    one_unknown = np.ones(N, bool)
    one_unknown[9] = False
    border = np.ones((4, 4), bool)
    border[[0, -1]] = border[:, [0, -1]] = False
    return np.stack([holes, one_unknown, border.reshape(-1), ~holes])


@pytest.mark.parametrize("order", ["lpd", "random", "raster"])
@pytest.mark.parametrize("prefill", ["one", "schedule"])
def test_known_tokens_come_back_exactly_for_any_mask(model, order, prefill):
    tokens = torch.randint(0, 24, (4, N), generator=torch.Generator().manual_seed(1))
    keep = masks()
    out = edit_tokens(
        model,
        tokens,
        keep,
        [0, 1, 2, 3],
        steps=1,
        prefill=prefill,
        generator=torch.Generator().manual_seed(2),
        sampling=SamplingConfig(order=order, cfg=2.0),
    )
    assert out.shape == (4, N) and torch.equal(
        out[torch.from_numpy(keep)], tokens[torch.from_numpy(keep)]
    )
    assert out.min() >= 0 and out.max() < 24
    again = edit_tokens(
        model,
        tokens,
        keep,
        [0, 1, 2, 3],
        steps=1,
        prefill=prefill,
        generator=torch.Generator().manual_seed(2),
        sampling=SamplingConfig(order=order, cfg=2.0),
    )
    assert torch.equal(out, again)  # seeded
    assert torch.equal(
        edit_tokens(model, tokens, np.ones((4, N), bool), [0, 1, 2, 3], steps=1), tokens
    )  # all known


def test_an_empty_mask_is_plain_generation(model):
    labels = torch.tensor([1, 4])
    raster = torch.arange(N).expand(2, N)
    plain = sample_tokens(
        model, labels, raster, [1, 3, 12], greedy=True, sampling=SamplingConfig(cfg=2.0)
    )
    got = edit_tokens(
        model,
        torch.zeros(2, N, dtype=torch.long),
        np.zeros((2, N), bool),
        labels,
        group_sizes=[1, 3, 12],
        greedy=True,
        sampling=SamplingConfig(order="raster", cfg=2.0),
    )
    assert torch.equal(got, plain)


@pytest.mark.parametrize("prefill", ["one", "schedule"])
def test_editing_logits_equal_the_training_pass_known_then_unknown(model, prefill):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 24, (3, N), generator=g)
    keep = np.zeros((3, N), bool)
    for b, m in enumerate((5, 5, 5)):  # the same count per image, different positions
        keep[b, np.random.RandomState(b).permutation(N)[:m]] = True
    unknown = torch.stack([torch.from_numpy(np.flatnonzero(~k)) for k in keep])
    labels = torch.tensor([0, 3, 4])
    sizes = [2, 4, 5]
    got = editing_logits(
        model,
        tokens,
        keep,
        labels,
        unknown,
        sizes,
        prefill=prefill,
        generator=torch.Generator().manual_seed(9),
    )
    perm, known_sizes = prefill_layout(prefill, 5, 64, torch.Generator().manual_seed(9))
    known = torch.stack([torch.from_numpy(np.flatnonzero(k)) for k in keep])[:, perm]
    with torch.no_grad():
        full = model.logits(tokens, labels, torch.cat([known, unknown], 1), known_sizes + sizes)
    assert (got - full[:, 5:]).abs().max().item() < 1e-5


def test_lpd_order_of_the_unknown_part_starts_next_to_the_known_region():
    keep = np.zeros((16, 16), bool)
    keep[8:] = True  # the lower half known
    orders = lpd_orders(
        200, [4] * 32, 16, 1.0, 2.0, seed=0, known=np.broadcast_to(keep.reshape(-1), (200, 256))
    )
    assert orders.shape == (200, 128) and not np.isin(orders, np.flatnonzero(keep)).any()
    first_rows = orders[:, :4] // 16
    assert (first_rows == 7).mean() > 0.9  # the first group sits on the row next to the known half


def test_regions_masks_and_token_keep():
    assert region_mask("bottom", 64)[32:].all() and not region_mask("bottom", 64)[:32].any()
    c = region_mask("center", 64)
    assert c[16:48, 16:48].all() and c.sum() == 32 * 32
    b = region_mask("border:16", 64)
    assert not b[16:48, 16:48].any() and b.sum() == 64 * 64 - 32 * 32
    assert region_mask("box:0,0,17,16", 64).sum() == 17 * 16
    keep = token_keep(region_mask("box:0,0,17,16", 64))
    assert (
        keep.shape == (N,) and not keep[0] and not keep[1] and keep[2:].all()
    )  # touching a patch regenerates it
    for bad in ("box:0,0,65,10", "box:5,5,5,9", "border:32", "diagonal"):
        with pytest.raises(ValueError, match="--region"):
            region_mask(bad, 64)


def test_pixels_in_pixels_out_with_a_vq(model, tmp_path):
    vq = make_tokenizer(
        "vq",
        None,
        dict(ch=32, ch_mult=[1, 1, 2, 2, 4], z_channels=64, codebook_size=24, codebook_embed_dim=8),
        seed=0,
    )
    img = (np.random.RandomState(0).rand(80, 96, 3) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = edit_images(
        model,
        vq,
        str(tmp_path / "in.png"),
        "left",
        2,
        num=2,
        steps=2,
        seed=0,
        sampling=SamplingConfig(cfg=2.0),
    )
    assert (
        out["source"].shape == (64, 64, 3)
        and out["edits"].shape == (2, 64, 64, 3)
        and out["edits"].dtype == np.uint8
    )
    pasted = edit_images(
        model,
        vq,
        out["source"],
        "left",
        2,
        num=2,
        steps=2,
        seed=0,
        paste=True,
        sampling=SamplingConfig(cfg=2.0),
    )
    assert np.array_equal(
        pasted["edits"][:, :, 32:], np.broadcast_to(out["source"][:, 32:], (2, 64, 32, 3))
    )
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    by_file = edit_images(
        model,
        vq,
        out["source"],
        str(tmp_path / "mask.png"),
        2,
        num=2,
        steps=2,
        seed=0,
        sampling=SamplingConfig(cfg=2.0),
    )
    assert np.array_equal(by_file["edits"], out["edits"])
    grey, src = out["masked"].astype(int), out["source"].astype(int)  # greyed inside the mask only
    assert np.array_equal(grey[:, 32:], src[:, 32:]) and grey[:, :32].min() >= 90
    assert (
        grey[:, :32].max() <= 90 + 0.3 * 255
        and np.corrcoef(grey[:, :32].ravel(), src[:, :32].ravel())[0, 1] > 0.99
    )

    class Bare:  # a tokenizer that does not name its patch: 16 px per token, as the VQ
        encode, decode = vq.encode, vq.decode

    bare = edit_images(
        model, Bare(), out["source"], "left", 2, num=2, steps=2, seed=0,
        sampling=SamplingConfig(cfg=2.0),
    )  # fmt: skip
    assert np.array_equal(bare["edits"], out["edits"])
    # no label: unconditional edit_tokens of the source's tokens, decoded
    uncond = edit_images(model, vq, out["source"], "left", None, num=2, steps=2, seed=0)
    with torch.no_grad():
        tokens = vq.encode(image_to_tensor(out["source"])).reshape(1, -1).expand(2, -1)
    keep = np.broadcast_to(token_keep(region_mask("left", 64), 16), (2, N)).copy()
    edited = edit_tokens(
        model, tokens, keep, None, steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert np.array_equal(uncond["edits"], decode_tokens(vq, edited, SamplingConfig()))


def test_clear_errors_before_any_work(model, tmp_path):
    tokens = torch.zeros(2, N, dtype=torch.long)
    keep = np.zeros((2, N), bool)
    keep[:, :8] = True
    with pytest.raises(ValueError, match="keep must be a bool mask"):
        edit_tokens(model, tokens, keep[:, :8], [0, 1], steps=2)
    with pytest.raises(ValueError, match="--label"):
        edit_tokens(model, tokens, keep, [0, 7], steps=2)
    for steps in (9, 0, None, True):
        with pytest.raises(ValueError, match="--steps must be an integer between 1 and the 8"):
            edit_tokens(model, tokens, keep, [0, 1], steps=steps)
    vq = make_tokenizer("palette", None, {"levels": 4})
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        edit_images(model, vq, str(tmp_path / "bad.png"), "left", 0, steps=2)
    with pytest.raises(ValueError, match="mask"):
        edit_images(
            model, vq, np.zeros((64, 64, 3), np.uint8), np.zeros((30, 30), bool), 0, steps=2
        )


def test_the_command_line_edits_a_demo_model(tmp_path, capsys):
    from lpd.edit import main
    from lpd.models import LPD, LPDConfig

    model = LPD(
        LPDConfig(img_size=256, embed_dim=32, depth=2, num_heads=4, vocab_size=4, class_num=10)
    )
    torch.save(
        {"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "demo.pth"
    )
    digit = np.zeros((256, 256, 3), np.uint8)
    digit[64:192, 96:160] = 255
    Image.fromarray(digit).save(tmp_path / "digit.png")
    argv = [
        "--config",
        "configs/demo.yaml",
        "--pretrained_ckpt",
        str(tmp_path / "demo.pth"),
        "--image",
        str(tmp_path / "digit.png"),
        "--region",
        "bottom",
        "--label",
        "3",
        "--steps",
        "4",
        "--num",
        "2",
        "--output",
        str(tmp_path / "out" / "e.png"),
    ]
    assert main(argv) == 0
    with Image.open(tmp_path / "out" / "e.png") as grid:
        grid = np.asarray(grid)
    top = grid.shape[0] - 256  # the strip naming the columns: source, masked, edit 0, edit 1
    assert grid.shape[1] == 4 * 256 + 3 * 2 and top > 8 and (grid[:top] < 128).any()
    for k in (0, 1):
        with Image.open(tmp_path / "out" / f"e_{k}.png") as im:
            edit = np.asarray(im)
        assert edit.shape == (256, 256, 3) and np.array_equal(
            edit[:128], digit[:128]
        )  # the known half, exactly
    assert np.array_equal(grid[top:, :256], digit)  # the source, under its label
    assert main(argv[:-4] + ["--steps", "999", "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--steps must be an integer between 1 and the 128" in err and "Traceback" not in err


def test_the_command_line_honours_model_with_a_checkpoint_file(tmp_path, capsys):
    from lpd.edit import main
    from lpd.models import LPD, LPDConfig

    # a released-format file (no model_config): --model names its architecture
    model = LPD(LPDConfig.from_name("lpd_tiny", 256, vocab_size=4, class_num=10))
    torch.save({"model": model.state_dict()}, tmp_path / "released.pth")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "x.png")
    common = [
        "--image",
        str(tmp_path / "x.png"),
        "--region",
        "center",
        "--label",
        "1",
        "--steps",
        "2",
        "--num",
        "1",
        "--tokenizer",
        "palette",
        "--cfg",
        "2",
        "--device",
        "cpu",
    ]
    argv = ["--model", "lpd_tiny", "--pretrained_ckpt", str(tmp_path / "released.pth"), *common]
    assert (
        main(argv + ["--output", str(tmp_path / "a.png")]) == 0 and (tmp_path / "a_0.png").is_file()
    )
    # a file of another architecture than --model is refused (before: --model was ignored)
    assert (
        main(
            [
                "--model",
                "lpd_l",
                "--pretrained_ckpt",
                str(tmp_path / "released.pth"),
                *common,
                "--output",
                str(tmp_path / "b.png"),
            ]
        )
        == 2
    )
    assert (
        "is --model the architecture" in capsys.readouterr().err
        and not (tmp_path / "b.png").exists()
    )


def test_the_command_line_names_every_missing_file_offline(tmp_path, monkeypatch, capsys):
    from lpd.edit import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "x.png")
    assert (
        main(
            [
                "--model",
                "lpd_xl",
                "--image",
                str(tmp_path / "x.png"),
                "--region",
                "center",
                "--output",
                str(tmp_path / "e.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: 2 files are missing") and "mit-han-lab/lpd_xl_256" in err
    assert "FoundationVision/LlamaGen" in err and "python -m lpd.download lpd_xl 256" in err


def test_the_command_line_never_writes_over_an_input_or_a_file_it_did_not_write(
    tmp_path, capsys, monkeypatch
):
    from lpd import edit
    from lpd.models import LPD, LPDConfig

    model = LPD(
        LPDConfig(img_size=256, embed_dim=32, depth=2, num_heads=4, vocab_size=4, class_num=10)
    )
    torch.save(
        {"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "demo.pth"
    )
    photo = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "x.png")
    Image.fromarray(photo).save(tmp_path / "e_1.png")
    original = (tmp_path / "x.png").read_bytes()
    base = [
        "--config",
        "configs/demo.yaml",
        "--pretrained_ckpt",
        str(tmp_path / "demo.pth"),
        "--image",
        str(tmp_path / "x.png"),
        "--label",
        "3",
        "--steps",
        "2",
        "--num",
        "2",
    ]

    def refused(argv, *says):
        assert edit.main(argv) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("error: ") and "Traceback" not in err and all(s in err for s in says)
        ), err

    with monkeypatch.context() as m:  # refused before the model is loaded
        m.setattr("lpd.models.load_lpd", lambda *a, **k: pytest.fail("the model was loaded"))
        refused(
            base + ["--region", "top", "--output", str(tmp_path / "x.png")],
            "--output",
            "is also --image",
            "never an input",
        )
        refused(
            base + ["--region", "top", "--output", str(tmp_path / "x.png"), "--overwrite"],
            "is also --image",
        )
        refused(
            base + ["--region", "top", "--output", str(tmp_path / "e.png")],
            "the edit",
            "e_1.png",
            "exists",
            "not written by lpd",
            "--overwrite",
        )  # a per-edit file <output>_<k>.png over the user's photo
        Image.fromarray(np.zeros((256, 256), np.uint8)).save(tmp_path / "black.png")
        refused(
            base + ["--mask", str(tmp_path / "black.png"), "--output", str(tmp_path / "o.png")],
            "--mask",
            "black.png",
            "selects no pixel",
        )
        (tmp_path / "m_1.png").write_bytes((tmp_path / "black.png").read_bytes())
        refused(
            base + ["--mask", str(tmp_path / "m_1.png"), "--output", str(tmp_path / "m.png")],
            "the edit",
            "is also --mask",
        )
    assert (tmp_path / "x.png").read_bytes() == original and not (tmp_path / "o.png").exists()
    # a 0/1 mask (it looks black) regenerates its ones; the known half comes back exactly
    ones = np.zeros((256, 256), np.uint8)
    ones[128:] = 1
    Image.fromarray(ones).save(tmp_path / "mask01.png")
    argv = base + ["--mask", str(tmp_path / "mask01.png"), "--output", str(tmp_path / "o.png")]
    assert edit.main(argv) == 0
    for k in (0, 1):
        with Image.open(tmp_path / f"o_{k}.png") as im:
            out = np.asarray(im)
        assert not np.array_equal(out[128:], photo[128:])  # the bottom half was regenerated
    assert edit.main(argv) == 0  # its own outputs it replaces
    assert (
        edit.main(base + ["--region", "top", "--output", str(tmp_path / "e.png"), "--overwrite"])
        == 0
    )
    assert (tmp_path / "x.png").read_bytes() == original


def test_every_public_name_is_defined():
    """``from lpd.editing import *`` imports every name of ``__all__``."""
    import lpd.editing

    assert all(hasattr(lpd.editing, name) for name in lpd.editing.__all__)
