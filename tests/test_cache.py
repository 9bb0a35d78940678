"""main_cache.py on a tiny ImageFolder with the tiny random VQ of configs/tiny.yaml: both layouts,
identical tokens, equal to encoding the ADM-cropped image (and its mirror) directly, resumable."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_cache
from lpd.config import load_config
from lpd.datasets import center_crop_arr, open_token_cache
from lpd.tokenizer import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
IMG = 64  # 4x4 tokens: cheap with the tiny VQ


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(root / cls)
        for i in range(3):
            h, w = (int(v) for v in rng.integers(40, 160, 2))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{cls}{i}.png")
    return root


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(image_folder, out, fmt, capsys):
    argv = ["--config", TINY, "--img_size", str(IMG), "--data_path", str(image_folder), "--cached_path", str(out),
            "--cache_format", fmt, "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
    assert main_cache.main(argv) == 0
    return capsys.readouterr().out


def test_main_cache_both_layouts_identical(image_folder, tmp_path, capsys, one_thread):
    out_r = run(image_folder, tmp_path / "released", "released", capsys)
    assert "encoded 6 images, 0 already cached" in out_r
    run(image_folder, tmp_path / "consolidated", "consolidated", capsys)
    n = (IMG // 16) ** 2
    rel = open_token_cache(str(tmp_path / "released"), n, 16384)
    con = open_token_cache(str(tmp_path / "consolidated"), n, 16384)
    assert len(rel) == len(con) == 6 and rel.classes == con.classes == ["cat", "dog"]
    assert sorted(os.listdir(tmp_path / "released" / "cat")) == ["cat0.png.npz", "cat1.png.npz", "cat2.png.npz"]
    for i in range(6):
        assert torch.equal(rel[i][0], con[i][0]) and rel[i][1] == con[i][1]

    # The tokens are those of the ADM-cropped image and of its mirror image.
    cfg = load_config(TINY)
    vq = make_tokenizer("vq", None, cfg["vq_config"], 0, "cpu")
    img = Image.open(image_folder / "dog" / "dog1.png")
    x = torch.from_numpy(center_crop_arr(img, IMG)).permute(2, 0, 1).float().div(127.5).sub(1)[None]
    want = torch.cat([vq.encode(x), vq.encode(x.flip(-1))]).reshape(2, n)
    assert torch.equal(rel[4][0], want)
    assert not torch.equal(want[0], want[1])

    # Resuming: a lost file is re-encoded, the rest skipped.
    os.remove(tmp_path / "released" / "dog" / "dog2.png.npz")
    out_again = run(image_folder, tmp_path / "released", "released", capsys)
    assert "encoded 1 images, 5 already cached" in out_again
    assert torch.equal(open_token_cache(str(tmp_path / "released"), n, 16384)[5][0], rel[5][0])


def test_training_from_images_equals_training_from_the_cache(image_folder, tmp_path, capsys, one_thread):
    """Same seed: encoding on the fly (flip chosen per sample) gives the updates of the cached tokens."""
    from lpd.train import TrainConfig, train

    run(image_folder, tmp_path / "cache", "consolidated", capsys)
    cfg = load_config(TINY)
    common = dict(model="lpd_tiny", img_size=IMG, model_config=cfg["model_config"], vq_config=cfg["vq_config"],
                  group_sizes_list="[1]*16; [1, 3, 5, 7]", epochs=2, batch_size=2, num_workers=0, device="cpu",
                  warmup_epochs=0, lr=1e-3, seed=0, save_every_steps=0, save_every_epochs=0)
    a = train(TrainConfig(**common, data_path=str(image_folder), output_dir=str(tmp_path / "a")), log=lambda m: None)
    b = train(TrainConfig(**common, use_cached=True, cached_path=str(tmp_path / "cache"), output_dir=str(tmp_path / "b")),
              log=lambda m: None)
    assert a.losses == b.losses and len(a.losses) == 6
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
