"""main_cache.py on a tiny ImageFolder with the tiny random VQ of configs/tiny.yaml: both layouts,
identical tokens, equal to encoding the ADM-cropped image (and its mirror) directly, resumable; reruns
with other inputs, bad values and undecodable images refused with one line and exit status 2;
incomplete or mismatched caches refused when training starts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_cache
from lpd.config import load_config
from lpd.datasets import open_token_cache
from lpd.images import center_crop_arr
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
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / cls / f"{cls}{i}.png"
            )
    return root


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(image_folder, out, fmt, capsys):
    argv = [
        "--config",
        TINY,
        "--img_size",
        str(IMG),
        "--data_path",
        str(image_folder),
        "--cached_path",
        str(out),
        "--cache_format",
        fmt,
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--device",
        "cpu",
    ]
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
    assert sorted(os.listdir(tmp_path / "released" / "cat")) == [
        "cat0.png.npz",
        "cat1.png.npz",
        "cat2.png.npz",
    ]
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


def test_training_from_images_equals_training_from_the_cache(
    image_folder, tmp_path, capsys, one_thread
):
    """Same seed: encoding on the fly (flip chosen per sample) gives the updates of the cached tokens."""
    from lpd.train import TrainConfig, train

    run(image_folder, tmp_path / "cache", "consolidated", capsys)
    cfg = load_config(TINY)
    common = dict(
        model="lpd_tiny",
        img_size=IMG,
        model_config=cfg["model_config"],
        vq_config=cfg["vq_config"],
        group_sizes_list="[1]*16; [1, 3, 5, 7]",
        epochs=2,
        batch_size=2,
        num_workers=0,
        device="cpu",
        warmup_epochs=0,
        lr=1e-3,
        seed=0,
        save_every_steps=0,
        save_every_epochs=0,
    )
    a = train(
        TrainConfig(**common, data_path=str(image_folder), output_dir=str(tmp_path / "a")),
        log=lambda m: None,
    )
    b = train(
        TrainConfig(
            **common,
            use_cached=True,
            cached_path=str(tmp_path / "cache"),
            output_dir=str(tmp_path / "b"),
        ),
        log=lambda m: None,
    )
    assert a.losses == b.losses and len(a.losses) == 6
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- refusals


def fail(argv, capsys):
    """main_cache.main(argv) must refuse with exit status 2 and one ``error:`` line; returns that line."""
    assert main_cache.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]  # a progress bar may come first
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err
    assert "Traceback" not in err
    return lines[-1]


def args(image_folder, out, *extra, fmt="released"):
    return [
        "--config",
        TINY,
        "--img_size",
        str(IMG),
        "--data_path",
        str(image_folder),
        "--cached_path",
        str(out),
        "--cache_format",
        fmt,
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


def snapshot(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.fixture(scope="module")
def done_cache(image_folder, tmp_path_factory):
    """A complete released cache of the tiny ImageFolder (tiny VQ of seed 0)."""
    out = tmp_path_factory.mktemp("done") / "cache"
    assert main_cache.main(args(image_folder, out)) == 0
    return out


def test_rerun_with_another_tokenizer_refused(image_folder, done_cache, capsys, one_thread):
    before = snapshot(done_cache)
    err = fail(
        args(image_folder, done_cache, "--seed", "1"), capsys
    )  # same architecture, other weights
    assert "tokenizer 'VQModel sha256:" in err and "another --cached_path, or delete" in err
    assert "img_size" not in err and snapshot(done_cache) == before


def test_rerun_with_another_img_size_refused(image_folder, done_cache, capsys, one_thread):
    before = snapshot(done_cache)
    err = fail(args(image_folder, done_cache, "--img_size", "32"), capsys)
    assert (
        "img_size 64 there, 32 now" in err
        and "num_tokens 16 there, 4 now" in err
        and "tokenizer" not in err
    )
    assert snapshot(done_cache) == before


def test_rerun_with_another_layout_refused(image_folder, done_cache, capsys, one_thread):
    err = fail(args(image_folder, done_cache, fmt="consolidated"), capsys)
    assert "format 'released' there, 'consolidated' now" in err


def test_rerun_after_the_record_was_deleted_refused(image_folder, tmp_path, capsys, one_thread):
    run(image_folder, tmp_path / "c", "consolidated", capsys)
    os.remove(tmp_path / "c" / "meta.json")
    assert "no meta.json" in fail(args(image_folder, tmp_path / "c", fmt="consolidated"), capsys)


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--img_size", "0", "--img_size 0: give an integer >= 1"),
        ("--img_size", "40", "--img_size 40: give a multiple of the tokenizer's stride 16"),
        ("--batch_size", "0", "--batch_size 0: give an integer >= 1"),
        ("--num_workers", "-1", "--num_workers -1: give an integer >= 0"),
        ("--shard_size", "-5", "--shard_size -5: give an integer >= 0"),
        (
            "--data_path",
            "/nonexistent/images",
            "--data_path /nonexistent/images: give an existing ImageFolder",
        ),
        ("--config", "/nonexistent/cfg.yaml", "--config '/nonexistent/cfg.yaml' cannot be read"),
        ("--vqgan_path", "/nonexistent/vq.pt", "VQ checkpoint '/nonexistent/vq.pt' not found"),
        ("--vq_config", "{chh: 32}", "--vq_config: unknown keys ['chh'] for the vq tokenizer"),
        ("--seed", "-1", "--seed must be an integer in [0, 2**64)"),
    ],
)
def test_bad_values_refused_before_any_work(image_folder, tmp_path, capsys, flag, value, says):
    argv = args(image_folder, tmp_path / "out")
    argv = (
        argv[: argv.index(flag) + 1] + [value] + argv[argv.index(flag) + 2 :]
        if flag in argv
        else argv + [flag, value]
    )
    assert says in fail(argv, capsys)
    assert not os.path.exists(tmp_path / "out")


def test_bad_value_in_the_config_file_refused(image_folder, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(open(TINY).read() + "batch_size: 0\n")
    argv = [
        "--config",
        str(cfg),
        "--data_path",
        str(image_folder),
        "--cached_path",
        str(tmp_path / "out"),
    ]
    assert "--batch_size 0: give an integer >= 1" in fail(argv, capsys)
    cfg.write_text("img_size: [64\n")
    assert "is not valid YAML" in fail(argv, capsys)


def test_cached_path_that_is_a_file_refused(image_folder, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert "--cached_path" in fail(args(image_folder, tmp_path / "f"), capsys)


def test_undecodable_image_named_and_nothing_encoded(image_folder, tmp_path, capsys, one_thread):
    import shutil

    imgs = tmp_path / "imgs"
    shutil.copytree(image_folder, imgs)
    good = (imgs / "dog" / "dog1.png").read_bytes()
    (imgs / "dog" / "dog1.png").write_bytes(good[: len(good) // 2])  # truncated
    err = fail(args(imgs, tmp_path / "out"), capsys)
    assert "1 image file(s) cannot be decoded" in err and str(imgs / "dog" / "dog1.png") in err
    assert os.listdir(tmp_path / "out") == []
    (imgs / "dog" / "dog1.png").write_bytes(good)  # replaced: the same command now runs
    assert main_cache.main(args(imgs, tmp_path / "out")) == 0


# ---------------------------------------------------------------------------------------------- training start


def train_config(tmp_path, cache, img_size=IMG, **kw):
    from lpd.train import TrainConfig

    cfg = load_config(TINY)
    return TrainConfig(
        model="lpd_tiny",
        img_size=img_size,
        model_config=cfg["model_config"],
        vq_config=cfg["vq_config"],
        group_sizes_list=f"[1]*{(img_size // 16) ** 2}",
        epochs=1,
        batch_size=2,
        num_workers=0,
        device="cpu",
        warmup_epochs=0,
        lr=1e-3,
        seed=0,
        save_every_steps=1,
        save_every_epochs=0,
        use_cached=True,
        cached_path=str(cache),
        output_dir=str(tmp_path / "run"),
        **kw,
    )


def test_released_cache_of_a_killed_writer_refused_at_open_and_training_start(
    image_folder, tmp_path, capsys, one_thread
):
    from lpd.datasets import CacheError, CacheJob, tokenizer_id, write_token_cache
    from lpd.datasets import image_folder as make_image_folder
    from lpd.train import train

    cfg = load_config(TINY)
    vq = make_tokenizer("vq", None, cfg["vq_config"], 0, "cpu")
    ds, cache = make_image_folder(str(image_folder), IMG), tmp_path / "cache"

    def rank(r):  # rank r of 2: rank 1 not run = killed before it wrote anything
        return write_token_cache(
            ds,
            str(cache),
            vq.encode,
            "released",
            tokenizer=tokenizer_id(vq),
            img_size=IMG,
            num_tokens=16,
            vocab_size=16384,
            job=CacheJob(r, 2, batch_size=2, num_workers=0, progress=False),
        )

    assert rank(0).written == 3
    with pytest.raises(CacheError, match="incomplete.*rerun main_cache.py with the same command"):
        open_token_cache(str(cache), 16, 16384)
    with pytest.raises(CacheError, match="incomplete"):
        train(train_config(tmp_path, cache), log=lambda m: None)
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".pth")]  # no step was taken
    assert rank(1).written == 3
    assert len(open_token_cache(str(cache), 16, 16384)) == 6


def test_cache_of_another_token_count_refused_at_training_start(
    image_folder, done_cache, tmp_path, one_thread
):
    from lpd.datasets import CacheError
    from lpd.train import train

    with pytest.raises(
        CacheError, match=r"meta\.json.* 16 tokens per image \(img_size 64\).* 64 \(8x8\)"
    ):
        train(train_config(tmp_path, done_cache, img_size=128), log=lambda m: None)
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".pth")]
