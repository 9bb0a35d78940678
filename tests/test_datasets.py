"""lpd.datasets: ADM centre crop, the released and consolidated token caches (writing, sharding,
resuming, reading, errors that name the file) and the deterministic epoch sampler of lpd.train."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lpd import datasets as D
from lpd.images import center_crop_arr, resolve_image_root
from lpd.recipe import EpochBatchSampler

N, V = 16, 1000


# ---------------------------------------------------------------------------------------------- crop


def test_center_crop_shapes_and_halving():
    rng = np.random.default_rng(0)
    for h, w in [(300, 700), (64, 64), (30, 50), (1000, 600)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        out = center_crop_arr(img, 64)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    flat = Image.new("RGB", (513, 257), (10, 200, 30))
    assert (center_crop_arr(flat, 128) == np.array([10, 200, 30], dtype=np.uint8)).all()
    # A left/right split image keeps its split in the centre column after the crop.
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 150:] = 255
    out = center_crop_arr(Image.fromarray(arr), 50)
    assert out[:, :20].max() == 0 and out[:, -20:].min() == 255


def test_resolve_image_root(tmp_path):
    (tmp_path / "a").mkdir()
    assert resolve_image_root(str(tmp_path)) == str(tmp_path)
    (tmp_path / "train").mkdir()
    assert resolve_image_root(str(tmp_path)) == os.path.join(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError):
        resolve_image_root(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- writing


class FakeImages(torch.utils.data.Dataset):
    """An ImageFolder stand-in: ``samples``, ``classes``, ``loader`` and (image in [-1, 1], label) items."""

    def __init__(self, n: int = 11, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
        self.classes = [f"c{i}" for i in range(classes)]
        self.samples = [(f"/x/c{i % classes}/img{i:03d}.JPEG", i % classes) for i in range(n)]
        self.samples.sort(key=lambda s: (s[1], s[0]))
        self.order = [int(p[-8:-5]) for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.images[self.order[i]], self.samples[i][1]

    @staticmethod
    def loader(path: str) -> Image.Image:  # the images are in memory: every path decodes
        return Image.new("RGB", (16, 16))


def fake_encode(x: torch.Tensor) -> torch.Tensor:
    """Deterministic, flip-sensitive 'tokenizer': [B, 3, 16, 16] -> [B, 4, 4] ids < V."""
    return ((x[:, 0, ::4, ::4] + 1) * 499.5).long().clamp(0, V - 1)


def write(ds, path, fmt, rank=0, world=1, encode=fake_encode, **kw):
    return D.write_token_cache(
        ds,
        str(path),
        encode,
        fmt,
        tokenizer="fake",
        img_size=64,
        num_tokens=N,
        vocab_size=V,
        job=D.CacheJob(rank, world, batch_size=3, num_workers=0, progress=False, **kw),
    )


def expected(ds, i):
    img = ds[i][0][None]
    return torch.cat([fake_encode(img), fake_encode(img.flip(-1))]).reshape(2, N)


@pytest.mark.parametrize("fmt", ["released", "consolidated"])
def test_write_sharded_and_read_back(tmp_path, fmt):
    ds = FakeImages()
    # Two ranks, one after the other (barriers are no-ops here); small shards for the consolidated layout.
    s0 = write(ds, tmp_path / fmt, fmt, rank=0, world=2, shard_size=4)
    # Rank 1 has not run yet (or was killed): the cache is incomplete and refused.
    assert D.read_record(str(tmp_path / fmt))["state"] == "incomplete"
    with pytest.raises(D.CacheError, match="incomplete.*rerun main_cache.py with the same command"):
        D.open_token_cache(str(tmp_path / fmt), N, V)
    s1 = write(ds, tmp_path / fmt, fmt, rank=1, world=2, shard_size=4)
    assert s0.written + s1.written == len(ds)
    assert D.read_record(str(tmp_path / fmt))["state"] == "complete"
    cache = D.open_token_cache(str(tmp_path / fmt), N, V)
    assert type(cache).__name__ == (
        "ReleasedTokenCache" if fmt == "released" else "ConsolidatedTokenCache"
    )
    assert len(cache) == len(ds)
    for i in range(len(ds)):
        tokens, label = cache[i]
        assert tokens.dtype == torch.int64 and tokens.shape == (2, N)
        assert torch.equal(tokens, expected(ds, i)) and label == ds[i][1]
    # Running again does nothing: everything is already there.
    again = write(ds, tmp_path / fmt, fmt, rank=0, world=1, shard_size=4)
    assert again.written == 0 and again.skipped == len(ds)


def test_released_file_layout(tmp_path):
    ds = FakeImages(4, 2)
    write(ds, tmp_path, "released")
    path = tmp_path / "c1" / "img001.JPEG.npz"
    with np.load(path) as z:
        assert sorted(z.files) == ["indices", "indices_flip"]
        assert z["indices"].dtype == np.int64 and z["indices"].shape == (N,)


def test_consolidated_resumes_after_interruption(tmp_path):
    ds = FakeImages(10, 2)
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("preempted")
        return fake_encode(x)

    kw = dict(
        tokenizer="fake",
        img_size=64,
        num_tokens=N,
        vocab_size=V,
        job=D.CacheJob(batch_size=2, num_workers=0, shard_size=3, progress=False),
    )
    with pytest.raises(KeyboardInterrupt):
        D.write_token_cache(ds, str(tmp_path), flaky, "consolidated", **kw)
    with pytest.raises(D.CacheError, match="incomplete"):
        D.open_token_cache(str(tmp_path), N, V)
    stats = D.write_token_cache(ds, str(tmp_path), fake_encode, "consolidated", **kw)
    assert (
        stats.skipped == 4 and stats.written == 6
    )  # two batches of two were committed before the stop
    cache = D.open_token_cache(str(tmp_path), N, V)
    assert all(torch.equal(cache[i][0], expected(ds, i)) for i in range(len(ds)))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_layouts_do_not_mix(tmp_path):
    ds = FakeImages(4, 2)
    write(ds, tmp_path, "released")
    with pytest.raises(
        D.CacheError, match="other inputs.*format 'released' there, 'consolidated' now"
    ):
        write(ds, tmp_path, "consolidated")


def test_rerun_with_other_images_refused_before_encoding(tmp_path):
    write(FakeImages(6, 2), tmp_path, "consolidated")
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    calls = []
    with pytest.raises(D.CacheError, match=r"num_images 6 there, 7 now; images .*delete"):
        write(FakeImages(7, 2), tmp_path, "consolidated", encode=lambda x: calls.append(x))
    assert not calls and {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("fmt", ["released", "consolidated"])
def test_deleted_or_corrupt_record_refused(tmp_path, fmt):
    ds = FakeImages(4, 2)
    write(ds, tmp_path, fmt)
    meta = tmp_path / "meta.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])  # a torn record
    with pytest.raises(
        D.CacheError, match=r"meta\.json.*cannot be read.*another --cached_path, or delete"
    ):
        write(ds, tmp_path, fmt)
    with pytest.raises(D.CacheError, match=r"meta\.json.*cannot be read"):
        D.open_token_cache(str(tmp_path), N, V)
    meta.write_text('{"format": "released"}')
    with pytest.raises(D.CacheError, match=r"meta\.json.*missing or bad.*tokenizer"):
        D.open_token_cache(str(tmp_path), N, V)
    meta.unlink()
    with pytest.raises(
        D.CacheError, match=r"holds files but no meta\.json.*another --cached_path, or delete"
    ):
        write(ds, tmp_path, fmt)
    if fmt == "consolidated":
        with pytest.raises(D.CacheError, match=r"no meta\.json"):
            D.open_token_cache(str(tmp_path), N, V)
    else:  # indistinguishable from a cache of the released code: read, with a warning
        with pytest.warns(UserWarning, match="completeness and tokenizer cannot be checked"):
            assert len(D.open_token_cache(str(tmp_path), N, V)) == 4


def test_undecodable_image_stops_before_anything_is_written(tmp_path):
    class OneBroken(FakeImages):
        @staticmethod
        def loader(path):
            if path.endswith("img003.JPEG"):
                raise OSError("image file is truncated")
            return Image.new("RGB", (16, 16))

    with pytest.raises(
        D.CacheError, match=r"1 image file\(s\) cannot be decoded.*img003\.JPEG.*truncated"
    ):
        write(OneBroken(6, 2), tmp_path, "released")
    assert os.listdir(tmp_path) == []


def test_a_stray_folder_shifts_no_label_and_a_mismatch_is_refused(tmp_path):
    ds = FakeImages(6, 3)
    write(ds, tmp_path, "released")
    stray = tmp_path / ".ipynb_checkpoints"  # sorts before every class
    stray.mkdir()
    np.savez(stray / "x.npz", indices=np.zeros(N, np.int64), indices_flip=np.zeros(N, np.int64))
    cache = D.open_token_cache(str(tmp_path), N, V)
    assert cache.classes == ds.classes and [cache[i][1] for i in range(6)] == [
        ds[i][1] for i in range(6)
    ]
    (tmp_path / "backup").mkdir()  # a visible folder that meta.json does not list
    (tmp_path / "c2").rename(tmp_path / "c2_old")
    with pytest.raises(
        D.CacheError,
        match=r"differ from its meta\.json \(on disk only: \['backup', 'c2_old'\], "
        r"recorded only: \['c2'\]\)",
    ):
        D.open_token_cache(str(tmp_path), N, V)


def _image_tree(tmp_path):
    """Classes a and b: the same file name in two sub-folders, a link loop, a link into another class, hidden
    files and folders; returns the root and the images it holds."""
    root = tmp_path / "imgs"
    for i, rel in enumerate(
        [
            "a/img.png",
            "a/2019/img.png",
            "a/2020/img.png",
            "b/x.png",
            "outside/y.png",
            ".ipynb_checkpoints/z.png",
            "a/.ipynb_checkpoints/z.png",
            "b/._x.png",
        ]
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / rel)
    (root / "outside").rename(tmp_path / "outside")
    os.symlink(root / "a", root / "a" / "2020" / "loop")  # a loop: a/2020/loop/2020/loop/...
    os.symlink(root / "a" / "2019", root / "b" / "seen")  # a folder read already (through class a)
    os.symlink(tmp_path / "outside", root / "b" / "ext")  # out of the data root: read once
    return root, ["a/img.png", "a/2019/img.png", "a/2020/img.png", "b/x.png", "b/ext/y.png"]


def test_image_folder_skips_hidden_entries_and_follows_each_link_once(tmp_path):
    root, want = _image_tree(tmp_path)
    ds = D.image_folder(str(root), 16)
    assert ds.classes == ["a", "b"]
    assert [(os.path.relpath(p, root), t) for p, t in ds.samples] == [
        (w, int(w[0] == "b")) for w in want
    ]
    # the released layout names files by their path in the class folder: nothing collides
    write(ds, tmp_path / "cache", "released")
    cache = D.open_token_cache(str(tmp_path / "cache"), N, V)
    assert sorted(os.path.relpath(f, tmp_path / "cache") for f in cache.files) == sorted(
        w + ".npz" for w in want
    )
    got = {os.path.relpath(f, tmp_path / "cache")[:-4]: cache[i] for i, f in enumerate(cache.files)}
    for i, w in enumerate(want):
        assert torch.equal(got[w][0], expected(ds, i)) and got[w][1] == ds.samples[i][1]
    assert write(ds, tmp_path / "cache", "released").skipped == len(
        want
    )  # complete: a rerun does nothing
    (root / "a" / "2019" / "img.png").unlink()
    (root / "b" / "x.png").unlink()
    (root / "b" / "ext").unlink()
    with pytest.raises(
        FileNotFoundError, match="class folder.*b .*hold no images.*already read through a link"
    ):
        D.image_folder(str(root), 16)


def test_image_folder_reads_16_bit_pngs_as_their_grey_values(tmp_path):
    grey = (np.arange(256).reshape(16, 16)).astype(np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(grey * 257).save(
        tmp_path / "a" / "g16.png"
    )  # I;16: torchvision's loader makes it white
    image, label = D.image_folder(str(tmp_path), 16)[0]
    assert label == 0 and torch.equal(
        image, ((torch.from_numpy(grey).float() / 127.5) - 1).expand(3, -1, -1)
    )


def test_images_that_would_share_a_cache_file_are_refused(tmp_path):
    ds = FakeImages(4, 2)
    ds.samples[1] = (
        ds.samples[0][0].replace("/x/", "/y/"),
        ds.samples[0][1],
    )  # no root: named by file name
    with pytest.raises(
        D.CacheError, match=r"two images would share the cache file c0/img000\.JPEG\.npz"
    ):
        write(ds, tmp_path, "released")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- errors


def _released(tmp_path, n=3):
    """A cache as the released code writes it (no meta.json)."""
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "a", exist_ok=True)
    for i in range(n):
        np.savez(
            tmp_path / "a" / f"{i}.npz",
            indices=rng.integers(0, V, N),
            indices_flip=rng.integers(0, V, N),
        )
    with pytest.warns(UserWarning, match="no meta.json"):
        return D.ReleasedTokenCache(str(tmp_path), N, V)


def test_released_errors_name_the_file(tmp_path):
    cache = _released(tmp_path)
    assert cache[0][0].shape == (2, N)
    bad = tmp_path / "a" / "1.npz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(D.CacheError, match=r"1\.npz.*corrupt or truncated"):
        cache[1]
    np.savez(
        tmp_path / "a" / "1.npz",
        indices=np.zeros(N + 1, np.int64),
        indices_flip=np.zeros(N + 1, np.int64),
    )
    with pytest.raises(D.CacheError, match=r"1\.npz.*holds 17 tokens.*16"):
        cache[1]
    np.savez(
        tmp_path / "a" / "2.npz",
        indices=np.full(N, V, np.int64),
        indices_flip=np.zeros(N, np.int64),
    )
    with pytest.raises(D.CacheError, match=r"2\.npz.*outside the vocabulary"):
        cache[2]
    np.savez(tmp_path / "a" / "2.npz", moments=np.zeros(N))
    with pytest.raises(D.CacheError, match=r"2\.npz.*'indices'"):
        cache[2]
    # Other shapes holding N values are accepted ([1, N] and [h, w] in other writers).
    np.savez(
        tmp_path / "a" / "0.npz",
        indices=np.zeros((1, N), np.int64),
        indices_flip=np.ones((4, 4), np.int64),
    )
    assert cache[0][0].tolist() == [[0] * N, [1] * N]


def test_consolidated_errors_name_the_file(tmp_path):
    ds = FakeImages(6, 2)
    write(ds, tmp_path, "consolidated", shard_size=3)
    toks = tmp_path / "shard-00001.tokens.npy"
    arr = np.load(toks)
    arr[1, 0, 0] = V + 5
    np.save(toks, arr)
    cache = D.open_token_cache(str(tmp_path), N, V)
    bad_index = [i for i in range(len(cache)) if cache.shard[i] == 1 and cache.row[i] == 1][0]
    with pytest.raises(
        D.CacheError, match=r"shard-00001\.tokens\.npy.*row 1.*outside the vocabulary"
    ):
        cache[bad_index]
    np.save(toks, arr[:, :, :8])
    with pytest.raises(D.CacheError, match=r"shard-00001\.tokens\.npy.*shape"):
        D.open_token_cache(str(tmp_path), N, V)


@pytest.mark.parametrize("fmt", ["released", "consolidated"])
def test_record_must_fit_the_model(tmp_path, fmt):
    write(FakeImages(4, 2), tmp_path, fmt)
    with pytest.raises(
        D.CacheError, match=r"meta\.json.* 16 tokens per image \(img_size 64\).* 64 \(8x8\)"
    ):
        D.open_token_cache(str(tmp_path), 64, V)
    with pytest.raises(
        D.CacheError,
        match=r"meta\.json.*1000-code tokenizer, larger than the model's vocabulary \(512\)",
    ):
        D.open_token_cache(str(tmp_path), N, 512)
    other = "consolidated" if fmt == "released" else "released"
    with pytest.raises(D.CacheError, match=f"describes a {fmt} cache, not a {other} one"):
        D.open_token_cache(str(tmp_path), N, V, other)


@pytest.mark.parametrize("fmt", ["released", "consolidated"])
def test_open_checks_the_first_item(tmp_path, fmt):
    write(FakeImages(4, 2), tmp_path, fmt)
    first = (
        tmp_path
        / ("c0" if fmt == "released" else "")
        / ("img000.JPEG.npz" if fmt == "released" else "shard-00000.tokens.npy")
    )
    if fmt == "released":
        np.savez(first, indices=np.full(N, V, np.int64), indices_flip=np.zeros(N, np.int64))
    else:
        arr = np.load(first)
        arr[0, 1, 3] = -1
        np.save(first, arr)
    with pytest.raises(D.CacheError, match=rf"{first.name}.*outside the vocabulary"):
        D.open_token_cache(str(tmp_path), N, V)


def test_missing_cache_folder(tmp_path):
    with pytest.raises(D.CacheError, match="main_cache.py"):
        D.open_token_cache(str(tmp_path / "nope"), N, V)


# ---------------------------------------------------------------------------------------------- sampler


def test_epoch_sampler_is_deterministic_sharded_and_skips():
    def batches(rank, world, epoch=0, start=0):
        return list(
            EpochBatchSampler(
                23, 3, seed=5, epoch=epoch, rank=rank, world_size=world, start_step=start
            )
        )

    a, b = batches(0, 2), batches(1, 2)
    assert (
        a == batches(0, 2) and len(a) == len(b) == 12 // 3
    )  # 23 -> 12 per rank (padded), 4 batches
    flat = [i for bt in a + b for i in bt]
    assert len(set(flat)) >= 22 and all(0 <= i < 23 for i in flat)
    assert batches(0, 2, start=2) == a[2:]
    assert batches(0, 2, epoch=1) != a
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(3, 4, seed=0, epoch=0)
