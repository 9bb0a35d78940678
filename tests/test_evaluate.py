"""lpd.evaluate: which image is which, sharding, resuming, the run folder, and the metrics path.

A very small LPD (4x4 token grid) and the tiny real VQ of the parity fixture keep the whole file to
seconds on a CPU. The metrics path uses a stand-in feature extractor: an Inception-v3, even with
random weights, takes about a second per image here (tests/test_metrics.py runs the real one).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lpd import evaluate as E
from lpd.images import image_path, read_png, save_grid, write_npz, write_png
from lpd.models import build_lpd
from lpd.orders import lpd_orders, random_orders, save_orders
from lpd.orders.source import OrderSource
from lpd.sampling import SamplingConfig

GRID, PATCH, VOCAB, CLASSES = (
    4,
    16,
    256,
    10,
)  # PATCH and VOCAB: the tiny VQ's downsampling and codebook
SIZES = [1, 3, 4, 8]


def small_model(seed: int = 0) -> torch.nn.Module:
    model = build_lpd(
        img_size=GRID * PATCH,
        vqgan_stride=PATCH,
        embed_dim=32,
        depth=1,
        num_heads=2,
        vocab_size=VOCAB,
        class_num=CLASSES,
    )
    model.initialize_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def stand_in_extractor(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, 3, H, W] -> (2x2 mean colours [B, 12], logits [B, 5]): a tiny 'Inception'."""
    x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)
    return x, 4 * x @ torch.linspace(-1, 1, 12 * 5).reshape(12, 5)


SAMPLING = SamplingConfig(cfg=2.0, repulsion_threshold=1.0)
RUN = dict(seed=3, eval_bsz=4)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture()
def tokenizer(tiny_vq):
    assert (tiny_vq.downsample_factor, tiny_vq.codebook_size) == (PATCH, VOCAB)
    return tiny_vq


def run_folder(path, model, tokenizer, n=10, sampling=SAMPLING, seed=3, **kw):
    spec = E.RunSpec(n, SIZES, seed=seed, **kw)
    E.prepare_run_dir(path, E.run_settings(model, tokenizer, spec, sampling), model.num_tokens)
    return path


def gen(model, tokenizer, n, sampling=SAMPLING, output_dir=None, shard=None, **kw):
    """generate_images of ``n`` images in groups of SIZES (``kw``: the rest of the RunSpec)."""
    spec = E.RunSpec(n, SIZES, **kw)
    return E.generate_images(model, tokenizer, spec, sampling, output_dir=output_dir, shard=shard)


def run_eval(model, tokenizer, n, sampling=SAMPLING, *, output_dir=None, name=None, info=None,
             compute_fid=True, ref_stats=None, feature_extractor=None, inception_weights=None,
             **kw):  # fmt: skip
    """evaluate of ``n`` images in groups of SIZES, scored unless ``compute_fid`` is False."""
    scoring = E.Scoring(ref_stats, feature_extractor, inception_weights) if compute_fid else None
    spec = E.RunSpec(n, SIZES, **kw)
    return E.evaluate(
        model, tokenizer, spec, sampling, output_dir=output_dir, name=name, scoring=scoring,
        info=info,
    )  # fmt: skip


# ------------------------------------------------------------------------------ image identity


def test_classes_follow_the_paper_rule():
    assert np.array_equal(E.image_classes(np.arange(50000), 50000, 1000), np.arange(50000) // 50)
    assert np.array_equal(E.image_classes(np.arange(20), 20, 1000), np.arange(20) * 50)
    counts = np.bincount(E.image_classes(np.arange(1234), 1234, 1000), minlength=1000)
    assert counts.min() == 1 and counts.max() == 2 and counts.sum() == 1234
    with pytest.raises(E.EvaluationError, match="positive integer"):
        E.image_classes([0], 0, 10)


def test_image_seeds_are_stable_and_distinct():
    seeds = {E.image_seed(0, i) for i in range(1000)} | {E.image_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000
    # written down once: a changed derivation would change every released run's images
    assert (E.image_seed(0, 7), E.image_seed(3, 0)) == (2941620403797343574, 3386346886314495343)
    assert E.image_seed(2**63, 2**40) == 9017283119339743397


@pytest.mark.parametrize("kind", ["lpd", "random", "raster"])
def test_order_rows_depend_only_on_seed_and_index(kind):
    src = OrderSource(kind, SIZES, GRID, seed=5, repulsion_threshold=1.0)
    whole = src.rows(np.arange(12))
    assert np.array_equal(src.rows(np.array([7, 8, 9, 2, 11, 3])), whole[[7, 8, 9, 2, 11, 3]])
    expected = {
        "lpd": lambda: lpd_orders(12, SIZES, GRID, 1.0, 1.0, seed=5),
        "random": lambda: random_orders(12, GRID, seed=5),
        "raster": lambda: np.tile(np.arange(GRID * GRID), (12, 1)),
    }[kind]()
    assert np.array_equal(whole, expected)


def test_order_table_is_validated():
    table = np.stack([np.random.RandomState(i).permutation(16) for i in range(3)])
    assert np.array_equal(OrderSource("lpd", SIZES, GRID, table=table).rows([2, 0]), table[[2, 0]])
    bad = table.copy()
    bad[1, 0] = bad[1, 1]
    with pytest.raises(ValueError, match="row 1: position .* appears twice"):
        OrderSource("lpd", SIZES, GRID, table=bad)
    with pytest.raises(ValueError, match="order must be"):
        OrderSource("spiral", SIZES, GRID)


# ------------------------------------------------------------------------------ sampling


def test_in_memory_generation_is_deterministic(model, tokenizer):
    a = gen(model, tokenizer, 10, SAMPLING, **RUN)
    b = gen(model, tokenizer, 10, SAMPLING, **RUN)
    assert a.images.shape == (10, GRID * PATCH, GRID * PATCH, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a.tokens.shape == (10, 16)
    assert not np.array_equal(a.tokens, gen(model, tokenizer, 10, SAMPLING, seed=4).tokens)
    assert a.generated == 10 and a.speed["timed_batches"] == 2  # 3 batches, the first is warm-up


def test_tokens_do_not_depend_on_batch_size_threads_or_shards(model, tokenizer, tmp_path):
    ref = gen(model, tokenizer, 9, SAMPLING, seed=1, eval_bsz=9)
    threads = torch.get_num_threads()
    try:
        for bsz, n_threads in ((1, 1), (2, 2), (4, 1), (100, 2)):
            torch.set_num_threads(n_threads)
            got = gen(model, tokenizer, 9, SAMPLING, seed=1, eval_bsz=bsz)
            assert np.array_equal(got.tokens, ref.tokens)
            if (
                n_threads == threads
            ):  # the VQ's convolutions round differently with another thread count
                assert np.array_equal(got.images, ref.images)
    finally:
        torch.set_num_threads(threads)
    run_folder(tmp_path, model, tokenizer, n=9, seed=1)
    for rank in (2, 0, 1):  # three independent jobs into one folder
        part = gen(
            model,
            tokenizer,
            9,
            SAMPLING,
            seed=1,
            eval_bsz=2,
            output_dir=tmp_path,
            shard=(rank, 3),
        )
        assert part.generated == 3
    tokens = np.load(tmp_path / "tokens.npy")
    assert tokens.dtype == np.int16 and np.array_equal(tokens, ref.tokens)
    for i in range(9):
        assert np.array_equal(read_png(image_path(tmp_path / "images", i)), ref.images[i])
    assert not [
        f for f in os.listdir(tmp_path / "images") if not f.endswith(".png")
    ]  # no temporary files


def test_a_huge_eval_bsz_samples_only_the_images_needed(model, tokenizer, monkeypatch):
    rows = []
    real = E.sample_batch
    monkeypatch.setattr(
        E, "sample_batch", lambda m, tok, idx, *a: rows.append(len(idx)) or real(m, tok, idx, *a)
    )
    gen(model, tokenizer, 2, SAMPLING, eval_bsz=100000)
    assert rows == [2]


def test_rerun_fills_in_missing_and_damaged_images_with_the_same_bytes(model, tokenizer, tmp_path):
    run_folder(tmp_path, model, tokenizer)
    gen(model, tokenizer, 10, SAMPLING, output_dir=tmp_path, **RUN)
    original = {i: (tmp_path / "images" / f"{i:06d}.png").read_bytes() for i in range(10)}
    os.remove(tmp_path / "images" / "000005.png")
    (tmp_path / "images" / "000009.png").write_bytes(original[9][:40])  # truncated
    again = gen(model, tokenizer, 10, SAMPLING, output_dir=tmp_path, **RUN)
    assert again.generated == 2 and again.skipped == 8
    for i in range(10):
        assert (tmp_path / "images" / f"{i:06d}.png").read_bytes() == original[i]
    assert gen(model, tokenizer, 10, SAMPLING, output_dir=tmp_path, **RUN).generated == 0


def test_explicit_labels_and_order_tables(model, tokenizer):
    table = lpd_orders(6, SIZES, GRID, 1.0, 1.0, seed=3)
    a = gen(model, tokenizer, 6, SAMPLING, orders=table, **RUN)
    b = gen(model, tokenizer, 6, SAMPLING, **RUN)
    assert np.array_equal(a.images, b.images)  # the same orders, once generated and once given
    assert not np.array_equal(
        b.images,
        gen(model, tokenizer, 6, SAMPLING, labels=[9] * 6, **RUN).images,
    )
    with pytest.raises(E.EvaluationError, match="6 integers"):
        gen(model, tokenizer, 6, SAMPLING, labels=[1, 2], **RUN)
    with pytest.raises(E.EvaluationError, match="integers"):
        gen(model, tokenizer, 6, SAMPLING, labels=[1.5] * 6, **RUN)
    with pytest.raises(ValueError, match="6 rows; image 7 needs more"):
        gen(model, tokenizer, 8, SAMPLING, orders=table, **RUN)


def test_a_wrapped_model_is_looked_through(model, tokenizer):
    class Wrapper(torch.nn.Module):  # stands for DistributedDataParallel
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    a = gen(Wrapper(model), tokenizer, 4, SAMPLING, **RUN)
    assert np.array_equal(a.images, gen(model, tokenizer, 4, SAMPLING, **RUN).images)


def test_in_memory_shards_need_a_process_group(model, tokenizer):
    with pytest.raises(E.EvaluationError, match="output folder"):
        gen(model, tokenizer, 4, SAMPLING, shard=(0, 2), **RUN)


def test_bf16_decodes_the_vq_under_autocast_unless_asked_not_to(model, tokenizer):
    seen = []  # the dtype of every decoder output
    hook = tokenizer.decoder.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        out = gen(model, tokenizer, 4, SAMPLING.replace(bf16=True), **RUN)
        assert out.images.shape == (4, GRID * PATCH, GRID * PATCH, 3) and set(seen) == {
            torch.bfloat16
        }
        seen.clear()
        gen(model, tokenizer, 4, SAMPLING.replace(bf16=True, decode_fp32=True), **RUN)
        assert set(seen) == {torch.float32}
    finally:
        hook.remove()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(cfg=-1.0), "cfg"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(eval_bsz=0), "eval_bsz"),
        (dict(bf16="false"), "bf16"),
    ],
)
def test_bad_settings_fail_before_sampling(model, tokenizer, bad, match, monkeypatch):
    monkeypatch.setattr(E, "sample_batch", lambda *a, **k: pytest.fail("an image was sampled"))
    run = {**RUN, **{k: v for k, v in bad.items() if k in RUN}}
    with pytest.raises(ValueError, match=match):
        sampling = SAMPLING.replace(**{k: v for k, v in bad.items() if k not in RUN})
        gen(model, tokenizer, 4, sampling, **run)


def test_speed_meter_drops_the_warm_up_batch():
    m = E.SpeedMeter()
    m.add(4, 10.0, 20.0)
    for n in (4, 4, 2):
        m.add(n, 1.0, 2.0)
    s = m.summary()
    assert s["timed_batches"] == 3 and s["tokens"]["s_per_batch"] == pytest.approx(1.0)
    assert s["tokens"]["images_per_s"] == pytest.approx(10 / 3) and s["tokens_and_decode"][
        "s_per_image"
    ] == pytest.approx(0.6)
    assert E.SpeedMeter().summary()["tokens"]["images_per_s"] is None
    m = E.SpeedMeter()
    m.add(1, 1.0, 1.0)
    m.add(2, 0.0, 0.0)  # a clock too coarse for the batch: no rate rather than a division by 0
    s = m.summary()
    assert s["tokens"] == dict.fromkeys(("images_per_s", "s_per_image", "s_per_batch"))
    assert s["total_images_per_s"] == {"tokens": None, "tokens_and_decode": None}


# ------------------------------------------------------------------------------ files and run folders


def test_npz_holds_exactly_the_png_pixels(tmp_path):
    imgs = np.random.RandomState(0).randint(0, 256, size=(5, 8, 12, 3)).astype(np.uint8)
    paths = [str(tmp_path / f"{i}.png") for i in range(5)]
    for p, im in zip(paths, imgs):
        write_png(p, im)
    write_npz(tmp_path / "all.npz", paths, (8, 12))
    with np.load(tmp_path / "all.npz") as data:
        assert (
            data.files == ["arr_0"]
            and data["arr_0"].dtype == np.uint8
            and np.array_equal(data["arr_0"], imgs)
        )
    assert read_png(paths[0], (8, 12)) is not None and read_png(paths[0], (8, 8)) is None
    with pytest.raises(ValueError, match="missing or unreadable"):
        write_npz(tmp_path / "bad.npz", paths + [str(tmp_path / "nope.png")], (8, 12))
    assert not (tmp_path / "bad.npz").exists()
    save_grid(tmp_path / "grid.png", list(imgs), ncol=2)
    assert (
        read_png(tmp_path / "grid.png", (28, 26)) is not None
    )  # 3 x 2 tiles of 8 x 12, 2-pixel gutters


def test_settings_record_the_inputs_by_content(model, tokenizer, tmp_path):
    spec = E.RunSpec(10, SIZES, seed=3)
    s = E.run_settings(model, tokenizer, spec, SAMPLING, name="small")
    digest = s["weights_sha256"]
    assert digest == E.run_settings(small_model(), tokenizer, spec, SAMPLING)["weights_sha256"]
    assert digest != E.run_settings(small_model(1), tokenizer, spec, SAMPLING)["weights_sha256"]
    assert s["cfg"] == 2.0 and s["labels"] == "rule" and s["repulsion_threshold"] == 1.0
    run_folder(tmp_path, model, tokenizer)
    (tmp_path / "images" / ".tmp-000001.png-abc").write_bytes(
        b"partial"
    )  # what a killed run could leave
    run_folder(tmp_path, model, tokenizer)  # the same inputs: fine, and the leftover is gone
    assert os.listdir(tmp_path / "images") == []


def test_reruns_with_other_inputs_are_refused(model, tokenizer, tmp_path):
    orders = tmp_path / "orders.json"
    save_orders(orders, lpd_orders(10, SIZES, GRID, seed=0))
    run_folder(tmp_path / "a", model, tokenizer, order_file=orders)
    save_orders(
        orders, lpd_orders(10, SIZES, GRID, seed=1)
    )  # another order file under the same name
    with pytest.raises(E.EvaluationError, match="order_file_sha256"):
        run_folder(tmp_path / "a", model, tokenizer, order_file=orders)
    run_folder(tmp_path / "b", model, tokenizer)
    with pytest.raises(
        E.EvaluationError, match="weights_sha256"
    ):  # other weights, however the file is named
        run_folder(tmp_path / "b", small_model(seed=1), tokenizer)
    with pytest.raises(E.EvaluationError, match="cfg: 2.0 on disk vs 3.0 now"):
        run_folder(tmp_path / "b", model, tokenizer, sampling=SAMPLING.replace(cfg=3.0))
    gen(model, tokenizer, 10, SAMPLING, output_dir=tmp_path / "b", **RUN)
    (tmp_path / "b" / "settings.json").write_text("{not json")
    with pytest.raises(E.EvaluationError, match="cannot be trusted"):
        run_folder(tmp_path / "b", model, tokenizer)
    os.remove(tmp_path / "b" / "settings.json")
    with pytest.raises(E.EvaluationError, match="no settings.json"):
        run_folder(tmp_path / "b", model, tokenizer)


# ------------------------------------------------------------------------------ metrics


def test_metrics_path_end_to_end_with_a_stand_in_extractor(model, tokenizer, tmp_path):
    from lpd import metrics as M

    ref = gen(model, tokenizer, 16, SAMPLING, **RUN).images
    stats = M.compute_statistics(ref, stand_in_extractor, progress=False)
    M.save_statistics(tmp_path / "ref.npz", stats.mu, stats.sigma)
    run = tmp_path / "run"
    rec = run_eval(
        model,
        tokenizer,
        16,
        SAMPLING,
        output_dir=run,
        name="small",
        ref_stats=str(tmp_path / "ref.npz"),
        feature_extractor=stand_in_extractor,
        info={"note": "test"},
        **RUN,
    )
    assert rec["fid"] == pytest.approx(0.0, abs=1e-6)  # the same images as the reference
    assert rec["inception_score"] > 1.0 and rec["num_images"] == 16 and rec["note"] == "test"
    on_disk = json.loads((run / "metrics.json").read_text())
    assert (
        on_disk["fid"] == rec["fid"]
        and on_disk["settings"]["cfg"] == 2.0
        and on_disk["settings"]["model"] == "small"
    )
    for key in ("speed", "device", "dtype", "versions", "world_size", "sampling"):
        assert key in on_disk
    with np.load(run / "run.npz") as data:
        assert np.array_equal(data["arr_0"], ref)
    assert (run / "samples_grid.png").is_file() and (run / "settings.json").is_file()
    # A rerun without scoring keeps the scores and the speed of the images it did not sample again.
    again = run_eval(
        model,
        tokenizer,
        16,
        SAMPLING,
        output_dir=run,
        name="small",
        compute_fid=False,
        **RUN,
    )
    assert (
        again["generated_this_run"] == 0
        and again["fid"] == rec["fid"]
        and again["speed"] == rec["speed"]
    )
    assert (
        json.loads((run / "metrics.json").read_text())["inception_score"] == rec["inception_score"]
    )
    mem = run_eval(
        model,
        tokenizer,
        16,
        SAMPLING,
        ref_stats=str(tmp_path / "ref.npz"),
        feature_extractor=stand_in_extractor,
        seed=11,
        eval_bsz=4,
    )
    assert mem["fid"] > 0 and mem["files"] == {}


def test_missing_statistics_or_weights_fail_before_sampling(model, tokenizer, tmp_path):
    from lpd import metrics as M

    with pytest.raises(FileNotFoundError, match="--fid_stats"):
        run_eval(
            model,
            tokenizer,
            4,
            SAMPLING,
            output_dir=tmp_path / "run",
            ref_stats=str(tmp_path / "nope.npz"),
            feature_extractor=stand_in_extractor,
            **RUN,
        )
    assert not (tmp_path / "run").exists()
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        run_eval(
            model,
            tokenizer,
            4,
            SAMPLING,
            ref_stats=str(tmp_path / "bad.npz"),
            feature_extractor=stand_in_extractor,
            **RUN,
        )
    M.save_statistics(
        tmp_path / "ref.npz", np.zeros(4), np.eye(4)
    )  # found and valid: the weights are next
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        run_eval(
            model,
            tokenizer,
            4,
            SAMPLING,
            output_dir=tmp_path / "run",
            ref_stats=str(tmp_path / "ref.npz"),
            inception_weights=str(tmp_path / "missing.pth"),
            **RUN,
        )
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_of_another_stride_or_statistics_of_another_width_fail_before_sampling(
    model, tokenizer, tmp_path, monkeypatch
):
    from lpd import metrics as M

    monkeypatch.setattr(E, "sample_batch", lambda *a, **k: pytest.fail("an image was sampled"))

    monkeypatch.setattr(
        tokenizer, "downsample_factor", PATCH // 2
    )  # 4x4 tokens into 32 px images, not 64
    with pytest.raises(
        E.EvaluationError,
        match=r"4x4 tokens into 32 px images, not the model's 64 px.*--vqgan_path",
    ):
        run_eval(
            model,
            tokenizer,
            4,
            SAMPLING,
            output_dir=tmp_path / "run",
            compute_fid=False,
            **RUN,
        )
    assert not (tmp_path / "run").exists()
    tokenizer.downsample_factor = PATCH
    M.save_statistics(
        tmp_path / "ref.npz", np.zeros(2048), np.eye(2048)
    )  # Inception's width; the extractor gives 12
    with pytest.raises(
        E.EvaluationError,
        match=r"ref\.npz are of 2048-d features, the feature extractor gives 12-d",
    ):
        run_eval(
            model,
            tokenizer,
            4,
            SAMPLING,
            output_dir=tmp_path / "run2",
            ref_stats=str(tmp_path / "ref.npz"),
            feature_extractor=stand_in_extractor,
            **RUN,
        )
    assert not (tmp_path / "run2").exists()


def test_a_second_evaluation_of_a_live_run_folder_is_refused_and_deletes_nothing(
    model, tokenizer, tmp_path
):
    from lpd.files import lock_folder

    run = tmp_path / "run"
    run_eval(model, tokenizer, 4, SAMPLING, output_dir=run, compute_fid=False, **RUN)
    in_flight = run / "images" / ".tmp-000004.png-abc"  # a PNG the live evaluation is writing
    in_flight.write_bytes(b"half a png")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    fd = lock_folder(
        str(run)
    )  # the live evaluation (a lock is per open file: this process counts as another)
    try:
        with pytest.raises(
            E.EvaluationError,
            match=r"run folder .*run is in use by process \d+ on .*another "
            r"evaluation is writing into it.*--run_name",
        ):
            run_eval(model, tokenizer, 4, SAMPLING, output_dir=run, compute_fid=False, **RUN)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        os.close(fd)
    # once it has ended (or was killed: the lock goes with the process) its temporary files are a killed run's
    rec = run_eval(model, tokenizer, 4, SAMPLING, output_dir=run, compute_fid=False, **RUN)
    assert rec["found_on_disk"] == 4 and not in_flight.exists()
    run_eval(
        model, tokenizer, 4, SAMPLING, output_dir=run, compute_fid=False, **RUN
    )  # released at the end
