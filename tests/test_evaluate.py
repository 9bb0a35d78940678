"""lpd.evaluate: which image is which, sharding, resuming, the files it writes, and the metrics path.

Everything runs on a very small LPD (4x4 token grid, 4 tokens) and a block tokenizer that paints
each token as a flat grey patch, so that the whole file takes seconds on a CPU.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lpd import evaluate as E
from lpd.models import build_lpd
from lpd.orders import lpd_orders, random_orders

GRID, PATCH, VOCAB, CLASSES = 4, 4, 4, 10
SIZES = [1, 3, 4, 8]


class BlockTokenizer(torch.nn.Module):
    """Token t -> a PATCH x PATCH patch of grey level -1 + 2 t / (VOCAB - 1) (the decode interface)."""

    downsample_factor = PATCH

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        grey = tokens.float() * (2.0 / (VOCAB - 1)) - 1.0
        img = grey.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
        return img[:, None].expand(-1, 3, -1, -1) + 0.01 * torch.linspace(-1, 1, 3)[None, :, None, None]


def small_model(seed: int = 0) -> torch.nn.Module:
    model = build_lpd(img_size=GRID * 16, embed_dim=32, depth=1, num_heads=2, vocab_size=VOCAB, class_num=CLASSES)
    model.initialize_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def stand_in_extractor(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, 3, H, W] -> (2x2 mean colours [B, 12], logits [B, 5]): a tiny 'Inception'."""
    x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)
    w = torch.linspace(-1, 1, 12 * 5).reshape(12, 5)
    return x, 4 * x @ w


SAMPLING = dict(order="lpd", repulsion_threshold=1.0, cfg=2.0, seed=3, eval_bsz=4)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def tokenizer():
    return BlockTokenizer()


# ------------------------------------------------------------------------------ image identity


def test_classes_follow_the_paper_rule_and_documented_fallbacks():
    labels = E.image_classes(np.arange(50000), 50000, 1000)
    assert np.array_equal(labels, np.arange(50000) // 50)
    assert np.array_equal(E.image_classes(np.arange(20), 20, 1000), np.arange(20) * 50)
    counts = np.bincount(E.image_classes(np.arange(1234), 1234, 1000), minlength=1000)
    assert counts.min() == 1 and counts.max() == 2 and counts.sum() == 1234
    labels = E.image_classes(np.arange(25), 25, 10)  # not a multiple: consecutive, balanced
    assert np.all(np.diff(labels) >= 0) and set(np.bincount(labels)) == {2, 3}
    with pytest.raises(E.EvaluationError, match="positive integer"):
        E.image_classes([0], 0, 10)
    with pytest.raises(E.EvaluationError, match="indices"):
        E.image_classes([5], 5, 10)


def test_image_seeds_are_stable_and_distinct():
    seeds = {E.image_seed(0, i) for i in range(1000)} | {E.image_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000
    assert E.image_seed(0, 7) == E.image_seed(0, 7) and 0 <= E.image_seed(2**40, 2**30) < 2**63


def test_batch_plan_is_fixed_and_covers_every_image():
    plan = E.batch_plan(10, 4)
    assert [b.tolist() for b in plan] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert np.resize(plan[-1], 4).tolist() == [8, 9, 8, 9]  # how the last batch is padded
    with pytest.raises(E.EvaluationError, match="eval_bsz"):
        E.batch_plan(10, 0)


@pytest.mark.parametrize("kind", ["lpd", "random", "raster"])
def test_order_rows_depend_only_on_seed_and_index(kind):
    src = E.OrderSource(kind, SIZES, GRID, seed=5, repulsion_threshold=1.0)
    whole = src.rows(np.arange(12))
    picked = src.rows(np.array([7, 8, 9, 2, 11, 3]))
    assert np.array_equal(picked, whole[[7, 8, 9, 2, 11, 3]])
    if kind == "lpd":
        assert np.array_equal(whole, lpd_orders(12, SIZES, GRID, 1.0, 1.0, seed=5))
    elif kind == "random":
        assert np.array_equal(whole, random_orders(12, GRID, seed=5))
    else:
        assert np.array_equal(whole, np.tile(np.arange(GRID * GRID), (12, 1)))


def test_order_table_is_validated():
    table = np.stack([np.random.RandomState(i).permutation(16) for i in range(3)])
    src = E.OrderSource("lpd", SIZES, GRID, table=table)
    assert np.array_equal(src.rows([2, 0]), table[[2, 0]])
    bad = table.copy()
    bad[1, 0] = bad[1, 1]
    with pytest.raises(E.EvaluationError, match="row 1 is not a permutation"):
        E.OrderSource("lpd", SIZES, GRID, table=bad)
    with pytest.raises(E.EvaluationError, match="order must be one of"):
        E.OrderSource("spiral", SIZES, GRID)


# ------------------------------------------------------------------------------ sampling


def test_in_memory_generation_is_deterministic_and_shape_correct(model, tokenizer):
    a = E.generate_images(model, tokenizer, 10, SIZES, **SAMPLING)
    b = E.generate_images(model, tokenizer, 10, SIZES, **SAMPLING)
    assert a.images.shape == (10, GRID * PATCH, GRID * PATCH, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    c = E.generate_images(model, tokenizer, 10, SIZES, **{**SAMPLING, "seed": 4})
    assert not np.array_equal(a.images, c.images)
    assert a.generated == 10 and a.speed["timed_batches"] == 2  # 3 batches, the first is warm-up


def test_shards_write_the_same_files_as_one_process(model, tokenizer, tmp_path):
    one = E.generate_images(model, tokenizer, 10, SIZES, output_dir=tmp_path / "one", **SAMPLING)
    for rank in (1, 0):  # two "processes" (no process group needed: each writes its own batches)
        part = E.generate_images(model, tokenizer, 10, SIZES, output_dir=tmp_path / "two", rank=rank,
                                 world_size=2, **SAMPLING)
        assert part.generated == (6 if rank == 0 else 4)  # batches 0 and 2 / batch 1
    for i in range(10):
        a = (tmp_path / "one" / f"{i:06d}.png").read_bytes()
        assert a == (tmp_path / "two" / f"{i:06d}.png").read_bytes()
    assert one.image_paths[3] == E.image_path(tmp_path / "one", 3)
    assert not [f for f in os.listdir(tmp_path / "one") if not f.endswith(".png")]  # no temporary files


def test_rerun_fills_in_missing_and_damaged_images_with_the_same_bytes(model, tokenizer, tmp_path):
    E.generate_images(model, tokenizer, 10, SIZES, output_dir=tmp_path, **SAMPLING)
    original = {i: (tmp_path / f"{i:06d}.png").read_bytes() for i in range(10)}
    os.remove(tmp_path / "000005.png")
    (tmp_path / "000009.png").write_bytes(original[9][:40])  # truncated
    again = E.generate_images(model, tokenizer, 10, SIZES, output_dir=tmp_path, **SAMPLING)
    assert again.generated == 2 and again.skipped == 8  # batches 1 and 2 sampled again, batch 0 skipped
    for i in range(10):
        assert (tmp_path / f"{i:06d}.png").read_bytes() == original[i]
    third = E.generate_images(model, tokenizer, 10, SIZES, output_dir=tmp_path, **SAMPLING)
    assert third.generated == 0 and third.skipped == 10


def test_explicit_labels_and_order_tables(model, tokenizer):
    table = lpd_orders(6, SIZES, GRID, 1.0, 1.0, seed=3)
    a = E.generate_images(model, tokenizer, 6, SIZES, orders=table, **SAMPLING)
    b = E.generate_images(model, tokenizer, 6, SIZES, **SAMPLING)
    assert np.array_equal(a.images, b.images)  # the same orders, once generated and once given
    c = E.generate_images(model, tokenizer, 6, SIZES, labels=[9] * 6, **SAMPLING)
    assert not np.array_equal(b.images, c.images)
    with pytest.raises(E.EvaluationError, match="one class per image"):
        E.generate_images(model, tokenizer, 6, SIZES, labels=[1, 2], **SAMPLING)
    with pytest.raises(E.EvaluationError, match="rows for 8 images"):
        E.generate_images(model, tokenizer, 8, SIZES, orders=table, **SAMPLING)


def test_a_wrapped_model_is_looked_through(model, tokenizer):
    class Wrapper(torch.nn.Module):  # stands for DistributedDataParallel
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    a = E.generate_images(Wrapper(model), tokenizer, 4, SIZES, **SAMPLING)
    assert np.array_equal(a.images, E.generate_images(model, tokenizer, 4, SIZES, **SAMPLING).images)


def test_in_memory_shards_need_a_process_group(model, tokenizer):
    with pytest.raises(E.EvaluationError, match="process group"):
        E.generate_images(model, tokenizer, 4, SIZES, rank=0, world_size=2, **SAMPLING)


def test_bf16_autocast_runs_on_the_cpu(model, tokenizer):
    out = E.generate_images(model, tokenizer, 4, SIZES, bf16=True, **SAMPLING)
    assert out.images.shape == (4, GRID * PATCH, GRID * PATCH, 3)


@pytest.mark.parametrize("bad, match", [
    (dict(top_p=0.0), "top_p"), (dict(cfg=-1.0), "cfg"), (dict(temperature=float("nan")), "temperature"),
    (dict(eval_bsz=0), "eval_bsz"),
])
def test_bad_sampling_settings_fail_before_sampling(model, tokenizer, bad, match):
    with pytest.raises(ValueError, match=match):
        E.generate_images(model, tokenizer, 4, SIZES, **{**SAMPLING, **bad})


def test_speed_meter_drops_the_warm_up_batch():
    m = E.SpeedMeter(batch_size=4)
    m.add(10.0, 20.0)
    for _ in range(3):
        m.add(1.0, 2.0)
    s = m.summary()
    assert s["timed_batches"] == 3
    assert s["tokens"]["s_per_batch"] == pytest.approx(1.0) and s["tokens"]["images_per_s"] == pytest.approx(4.0)
    assert s["tokens_and_decode"]["s_per_image"] == pytest.approx(0.5)
    assert E.SpeedMeter(4).summary()["tokens"]["images_per_s"] is None


# ------------------------------------------------------------------------------ files


def test_npz_holds_exactly_the_png_pixels(tmp_path):
    rng = np.random.RandomState(0)
    imgs = rng.randint(0, 256, size=(5, 8, 12, 3)).astype(np.uint8)
    paths = [str(tmp_path / f"{i}.png") for i in range(5)]
    for p, im in zip(paths, imgs):
        E.write_png(p, im)
    E.write_npz(tmp_path / "all.npz", paths, (8, 12))
    with np.load(tmp_path / "all.npz") as data:
        assert data.files == ["arr_0"]
        assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], imgs)
    assert E.read_png(paths[0], (8, 12)) is not None and E.read_png(paths[0], (8, 8)) is None
    with pytest.raises(E.EvaluationError, match="missing or unreadable"):
        E.write_npz(tmp_path / "bad.npz", paths + [str(tmp_path / "nope.png")], (8, 12))
    assert not (tmp_path / "bad.npz").exists()
    E.save_grid(tmp_path / "grid.png", list(imgs), ncol=2)
    assert E.read_png(tmp_path / "grid.png", (24, 24)) is not None


def test_run_names_and_settings():
    s = E.pixel_settings(model="lpd_l", img_size=256, num_images=50000, group_sizes=[1] * 20, order="lpd",
                         seed=0, cfg=4.8, repulsion_threshold=2.0)
    assert E.run_name(s) == "lpd_l-res256-steps20-cfg4.8-lpd-tr2.0-seed0"
    s2 = E.pixel_settings(model="lpd_xl", img_size=512, num_images=1000, group_sizes=[1] * 48, order="random",
                          seed=1, cfg=6.0, cfg_schedule="constant", top_k=100, bf16=True)
    assert E.run_name(s2) == "lpd_xl-res512-steps48-cfg6.0-cfgconst-random-topk100-bf16-n1000-seed1"


def test_a_folder_of_another_run_is_refused(tmp_path):
    s = E.pixel_settings(model="m", img_size=64, num_images=4, group_sizes=SIZES, order="lpd", seed=0)
    E.prepare_run_dir(tmp_path, s)
    (tmp_path / "images" / ".tmp-000001.png-abc").write_bytes(b"partial")  # what a killed run could leave
    E.prepare_run_dir(tmp_path, s)  # same settings: fine, and the leftover is gone
    assert os.listdir(tmp_path / "images") == []
    with pytest.raises(E.EvaluationError, match="cfg: 1.0 on disk vs 2.0 now"):
        E.prepare_run_dir(tmp_path, {**s, "cfg": 2.0})


# ------------------------------------------------------------------------------ metrics


def test_metrics_path_end_to_end_with_a_stand_in_extractor(model, tokenizer, tmp_path):
    from lpd import metrics as M

    ref = E.generate_images(model, tokenizer, 32, SIZES, **SAMPLING).images
    stats = M.compute_statistics(ref, stand_in_extractor, progress=False)
    M.save_statistics(tmp_path / "ref.npz", stats.mu, stats.sigma)
    settings = E.pixel_settings(model="small", img_size=64, num_images=32, group_sizes=SIZES, order="lpd",
                                seed=3, cfg=2.0)
    run = tmp_path / "run"
    rec = E.evaluate(model, tokenizer, 32, SIZES, output_dir=run, settings=settings,
                     ref_stats=str(tmp_path / "ref.npz"), feature_extractor=stand_in_extractor,
                     info={"note": "test"}, **SAMPLING)
    assert rec["fid"] == pytest.approx(0.0, abs=1e-6)  # the same images as the reference
    assert rec["inception_score"] > 1.0 and rec["num_images"] == 32 and rec["note"] == "test"
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["fid"] == rec["fid"] and on_disk["settings"]["cfg"] == 2.0
    for key in ("speed", "device", "dtype", "versions", "world_size", "sampling"):
        assert key in on_disk
    assert on_disk["versions"]["torch"] == torch.__version__
    with np.load(run / "run.npz") as data:
        assert np.array_equal(data["arr_0"], ref)
    assert (run / "samples_grid.png").is_file() and (run / "settings.json").is_file()
    # In memory, other samples: a positive distance.
    mem = E.evaluate(model, tokenizer, 32, SIZES, ref_stats=str(tmp_path / "ref.npz"),
                     feature_extractor=stand_in_extractor, **{**SAMPLING, "seed": 11})
    assert mem["fid"] > 0 and mem["files"] == {}


def test_missing_statistics_fail_before_sampling(model, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="--fid_stats"):
        E.evaluate(model, tokenizer, 4, SIZES, output_dir=tmp_path / "run", ref_stats=str(tmp_path / "nope.npz"),
                   feature_extractor=stand_in_extractor, **SAMPLING)
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        E.evaluate(model, tokenizer, 4, SIZES, ref_stats=str(bad), feature_extractor=stand_in_extractor, **SAMPLING)


def test_missing_inception_weights_fail_before_sampling(model, tokenizer, tmp_path):
    from lpd import metrics as M

    M.save_statistics(tmp_path / "ref.npz", np.zeros(4), np.eye(4))  # found and valid: the weights are next
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        E.evaluate(model, tokenizer, 4, SIZES, output_dir=tmp_path / "run", ref_stats=str(tmp_path / "ref.npz"),
                   inception_weights=str(tmp_path / "missing.pth"), **SAMPLING)
    assert not (tmp_path / "run").exists()
