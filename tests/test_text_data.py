"""Caption data: the three formats read alike and give the same caption cache; bad inputs are
counted or refused with one line; captions per epoch; the cache read back; streaming tar shards."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import main_cache
from lpd.datasets import CacheError, read_record
from lpd.images import center_crop_arr, image_to_tensor
from lpd.recipe import EpochBatchSampler
from lpd.text.data import CaptionStream, caption_choice, detect_format, iter_captions, scan_captions
from lpd.text.encoders import make_text_encoder
from lpd.text.training import CaptionTokenCache

IMG = 64  # palette tokenizer: 4 x 4 tokens
CAPTIONS = {
    "a0": "a small seven in the top left",
    "a1": "a bold 3",
    "b/b2": "two digits: a 3 to the left of a 5",
    "b/b3": "eight",
    "c4": "a thin one in the bottom right",
}


def _png(seed, size=(48, 40)):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "png")
    return buf.getvalue()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_formats(root, captions):
    """The same data (keys in order) as a folder, a JSONL manifest beside its images and two tar
    shards."""
    root.mkdir(exist_ok=True)
    (root / "folder").mkdir()
    (root / "jsonl").mkdir()
    rows, keys = [], list(captions)
    for i, key in enumerate(keys):
        for base in (root / "folder", root / "jsonl"):
            os.makedirs(os.path.dirname(base / key), exist_ok=True)
            (base / f"{key}.png").write_bytes(_png(i))
        (root / "folder" / f"{key}.txt").write_text(captions[key] + "\n", encoding="utf-8")
        rows.append({"image": f"{key}.png", "caption": captions[key]})
    (root / "jsonl" / "data.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    (root / "wds").mkdir()
    for s, part in enumerate((keys[:3], keys[3:])):
        with tarfile.open(root / "wds" / f"shard-{s:03d}.tar", "w") as tf:
            for key in part:
                _add(tf, f"{key}.png", _png(keys.index(key)))
                _add(tf, f"{key}.txt", captions[key].encode())
    return {
        f: str(root / f / ("data.jsonl" if f == "jsonl" else "")).rstrip("/")
        for f in ("folder", "jsonl", "wds")
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("captions"), CAPTIONS)


@pytest.fixture(scope="module")
def encoder():
    return make_text_encoder("wordllama", max_text_tokens=8)


BASE = f"--tokenizer palette --img_size {IMG} --num_workers 0 --device cpu".split()


def cache(path, out, *extra):
    argv = ["--data_path", path, "--cached_path", str(out), "--captions", "auto"]
    return main_cache.main(BASE + argv + ["--max_text_tokens", "8", "--batch_size", "2", *extra])


def test_formats_are_detected(data):
    assert [detect_format(data[f]) for f in ("folder", "jsonl", "wds")] == [
        "folder",
        "jsonl",
        "wds",
    ]
    assert detect_format(os.path.join(data["wds"], "shard-{000..001}.tar")) == "wds"


def test_the_three_formats_read_alike(data):
    got = {}
    for fmt, path in data.items():
        items, report, _ = scan_captions(path)
        assert [(it.key, it.captions) for it in items] == [(k, [c]) for k, c in CAPTIONS.items()], (
            fmt
        )
        assert report.images == 5 and report.summary() == "5 images with captions"
        got[fmt] = [(k, np.asarray(im).tobytes(), caps) for k, im, caps in iter_captions(path)]
    assert got["folder"] == got["jsonl"] == got["wds"] and len(got["wds"]) == 5


def test_the_three_formats_give_the_same_cache(data, tmp_path, capsys):
    for fmt, path in data.items():
        assert cache(path, tmp_path / fmt) == 0, capsys.readouterr().err
        assert "5 images with captions" in capsys.readouterr().out
    names = sorted(os.listdir(tmp_path / "folder"))
    assert "captions.npz" in names and "meta.json" in names
    for fmt in ("jsonl", "wds"):
        assert sorted(os.listdir(tmp_path / fmt)) == names
        for name in names:
            assert (tmp_path / fmt / name).read_bytes() == (
                tmp_path / "folder" / name
            ).read_bytes(), (fmt, name)
    rec = read_record(str(tmp_path / "wds"))
    assert (
        rec["state"] == "complete"
        and rec["num_images"] == 5
        and rec["captions"]["num_captions"] == 5
    )
    assert (
        rec["captions"]["text_encoder"]["kind"] == "wordllama"
        and rec["captions"]["max_text_tokens"] == 8
    )
    # the cache read back: image tokens (and flips) of the cropped images, the captions' token ids
    ds = CaptionTokenCache(str(tmp_path / "wds"), (IMG // 16) ** 2, 4)
    enc = make_text_encoder("wordllama", max_text_tokens=8)
    from lpd.tokenizer.palette import PaletteTokenizer

    pal = PaletteTokenizer(4)
    for i, caption in enumerate(CAPTIONS.values()):
        tokens, ids, mask = ds[i]
        img = image_to_tensor(center_crop_arr(Image.open(io.BytesIO(_png(i))), IMG))
        assert tokens[0].tolist() == pal.encode(img).reshape(-1).tolist()
        assert tokens[1].tolist() == pal.encode(img.flip(-1)).reshape(-1).tolist()
        want, want_mask, _ = enc.tokenize([caption], length=8)
        assert ids.tolist() == want[0].tolist() and mask.tolist() == want_mask[0].tolist()
    # a rerun resumes (nothing to encode); another text encoder setting is refused
    assert cache(data["folder"], tmp_path / "folder") == 0
    assert "0 images, 5 already cached" in capsys.readouterr().out
    assert cache(data["folder"], tmp_path / "folder", "--max_text_tokens", "16") == 2
    assert "holds a cache of other inputs (captions" in capsys.readouterr().err


def test_bad_inputs_are_counted_and_nothing_else_is_lost(tmp_path, encoder):
    caps = {"ok0": "a seven", "empty": "   ", "long": "a very long caption " * 10, "ok1": "three"}
    paths = write_formats(tmp_path, caps)
    folder = tmp_path / "folder"
    (folder / "nocap.png").write_bytes(_png(9))  # an image without a caption
    (folder / "badtext.png").write_bytes(_png(10))
    (folder / "badtext.txt").write_bytes(b"\xff\xfe\x00bad")  # not UTF-8
    items, report, _ = scan_captions(str(folder))
    assert [it.key for it in items] == ["long", "ok0", "ok1"]
    assert report.no_caption == ["empty", "nocap"] and report.empty_captions == 1
    assert len(report.bad_text) == 1 and "badtext.txt" in report.bad_text[0]
    assert "1 bad text" in report.summary() and "2 no caption (empty, nocap)" in report.summary()
    # JSONL: a broken line, a missing image, a caption list with an empty entry
    man = tmp_path / "jsonl" / "data.jsonl"
    man.write_text(
        man.read_text()
        + "{not json\n"
        + json.dumps({"image": "gone.png", "caption": "x"})
        + "\n"
        + json.dumps({"image": "ok0.png", "caption": ["", "again"]})
        + "\n"
    )
    items, report, _ = scan_captions(str(man))
    assert [it.key for it in items] == ["ok0", "long", "ok1", "ok0"]
    assert items[-1].captions == ["again"] and report.empty_captions == 2
    assert "line 5" in report.bad_text[0] and "gone.png" in report.missing_images[0]
    # a tar shard cut in the middle: its complete samples are kept, the cut is reported
    shard = os.path.join(paths["wds"], "shard-000.tar")
    data = open(shard, "rb").read()
    with tarfile.open(shard) as tf:
        cut = [m for m in tf.getmembers() if m.name == "long.txt"][0].offset_data + 4
    open(shard, "wb").write(data[:cut])
    items, report, _ = scan_captions(paths["wds"])
    assert [it.key for it in items] == ["ok0", "ok1"] and report.no_caption == ["empty", "long"]
    assert len(report.cut_shards) == 1 and "shard-000.tar" in report.cut_shards[0]
    rep = type(report)()
    assert [k for k, _, _ in iter_captions(paths["wds"], report=rep)] == ["ok0", "ok1"]
    assert len(rep.cut_shards) == 1 and rep.no_caption == ["empty", "long"]
    # a long caption is truncated to max_text_tokens and counted
    ids, n = encoder.token_ids(["a seven", caps["long"]])
    assert n == 1 and [len(x) for x in ids] == [3, 8]


def test_undecodable_image_refused_before_encoding(tmp_path, capsys):
    paths = write_formats(tmp_path, {"a": "one", "b": "two"})
    (tmp_path / "folder" / "b.png").write_bytes(b"not a png")
    assert cache(paths["folder"], tmp_path / "out") == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert (
        err.startswith("error: 1 image file(s) cannot be decoded, nothing was encoded")
        and "b.png" in err
    )
    assert "not a readable image" in err
    rep = type(scan_captions(paths["folder"])[1])()
    assert [k for k, _, _ in iter_captions(paths["folder"], report=rep)] == ["a"] and len(
        rep.bad_images
    ) == 1


@pytest.mark.parametrize(
    "path, match",
    [("nowhere.bin", "give a folder of images"), ("x-{000..001}.tar", "tar shards missing")],
)
def test_bad_data_paths_are_one_line(tmp_path, capsys, path, match):
    assert cache(str(tmp_path / path), tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data_path") and match in err and "Traceback" not in err


def test_several_captions_one_per_epoch(tmp_path, capsys):
    man = tmp_path / "data.jsonl"
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "images" / f"{i}.png").write_bytes(_png(i))
        rows.append(
            {"image": f"images/{i}.png", "caption": [f"caption {i} {j}" for j in range(i % 3 + 1)]}
        )
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cache(str(man), tmp_path / "out", "--caption_features") == 0
    enc = make_text_encoder("wordllama", max_text_tokens=8)
    ds = CaptionTokenCache(
        str(tmp_path / "out"), (IMG // 16) ** 2, 4, seed=3, text_encoder=enc.record
    )
    feats = CaptionTokenCache(str(tmp_path / "out"), (IMG // 16) ** 2, 4, seed=3, features=True)
    seen = {i: set() for i in range(6)}
    for epoch in range(12):
        ds.set_epoch(epoch)
        feats.set_epoch(epoch)
        for i in range(6):
            _, ids, mask = ds[i]
            j = caption_choice(3, epoch, i, i % 3 + 1)
            want, want_mask, _ = enc.tokenize([f"caption {i} {j}"], length=8)
            assert ids.tolist() == want[0].tolist() and mask.tolist() == want_mask[0].tolist()
            _, f, fmask = feats[i]
            torch.testing.assert_close(f, enc.encode(want, want_mask)[0].half().float())
            seen[i].add(j)
    assert all(seen[i] == set(range(i % 3 + 1)) for i in range(6))  # every caption gets its epochs
    assert caption_choice(3, 5, 4, 3) == caption_choice(3, 5, 4, 3)
    with pytest.raises(CacheError, match="text encoder"):
        CaptionTokenCache(
            str(tmp_path / "out"), 16, 4, text_encoder={"name": "t5", "digest": "other"}
        )


def test_image_cache_without_captions_is_refused(tmp_path, capsys):
    root = tmp_path / "imgs" / "cls"
    root.mkdir(parents=True)
    for i in range(2):
        (root / f"{i}.png").write_bytes(_png(i))
    argv = ["--data_path", str(tmp_path / "imgs"), "--cached_path", str(tmp_path / "out")]
    argv += ["--cache_format", "consolidated"]
    assert main_cache.main(BASE + argv) == 0
    with pytest.raises(CacheError, match="without captions"):
        CaptionTokenCache(str(tmp_path / "out"), 16, 4)


def test_stream_over_tar_shards(data, encoder):
    """The stream's samples: the cropped images and their captions' token ids, as read alike."""
    want = {}
    for _, im, caps in iter_captions(data["wds"]):
        tok, m, _ = encoder.tokenize(caps, length=8)
        img = image_to_tensor(center_crop_arr(im, IMG))[0]
        want[img.numpy().tobytes()] = (tok[0].tolist(), m[0].tolist())
    stream = CaptionStream(data["wds"], IMG, encoder, seed=1)
    got = {img.numpy().tobytes(): (ids.tolist(), mask.tolist()) for img, ids, mask in stream}
    assert got == want and len(stream) == stream.report.images == 5
    loader = stream.loader(EpochBatchSampler(5, 1, 1, 0), num_workers=2)
    assert loader.num_workers == 2 and sum(len(b[0]) for b in loader) == 5
