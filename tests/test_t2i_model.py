"""The text-conditional model: caption features become prefix rows; teacher-forced decoding equals
the training pass for prompts of different lengths, padded rows change nothing, guidance uses the
null caption or a negative prompt, caption dropout trains the null caption."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import run_process
from PIL import Image

import main_cache
import main_train
from lpd.evaluate import image_seed
from lpd.files import save_checkpoint
from lpd.models import LPDConfig, build_lpd, load_lpd
from lpd.orders.source import OrderSource
from lpd.pipeline import LPDPipeline
from lpd.pipeline import main as pipeline_main
from lpd.recipe import parse_schedule_list
from lpd.sampling import Decoder, SamplingConfig, decode_tokens
from lpd.schedules import group_sizes
from lpd.text.encoders import check_encoder_record, make_text_encoder
from lpd.tokenizer import make_tokenizer

C, D, L = 12, 32, 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SIZES = [[1, 2, 3, 10], [4, 4, 8], [16]]


def text_model(seed: int, **arch) -> torch.nn.Module:
    """A tiny text model on the 4 x 4 grid with non-trivial caption row positions and null
    caption."""
    torch.manual_seed(seed)
    m = build_lpd(img_size=64, embed_dim=D, depth=2, num_heads=4, condition="text", **arch)
    with torch.no_grad():
        m.text.pos.normal_(0, 0.5)
        m.text.null.normal_(0, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return text_model(0, vocab_size=24, text_dim=C, max_text_tokens=8, proj_dropout=0.0)


def captions(B: int, seed: int, length: int = L):
    """Features ``[B, length, C]``, lengths 1.. (one caption with a hole), tokens and orders."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, length, C, generator=g)
    lengths = torch.tensor([1 + (2 * b + 3) % length for b in range(B)])
    mask = torch.arange(length)[None] < lengths[:, None]
    mask[0, :3] = torch.tensor([True, False, True])
    tokens = torch.randint(0, 24, (B, 16), generator=g)
    orders = torch.stack([torch.randperm(16, generator=g) for _ in range(B)])
    return features, mask, tokens, orders


def repad(features, mask, seed):
    noise = 30 * torch.randn(features.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(mask[..., None], features, noise)


def test_config_and_state():
    cfg = LPDConfig(condition="text", text_dim=C, max_text_tokens=8)
    assert LPDConfig().condition == "class" and LPDConfig().max_text_tokens == 120
    with pytest.raises(ValueError, match="condition must be"):
        LPDConfig(condition="image")
    with pytest.raises(ValueError, match="text_dim must be a positive integer"):
        LPDConfig(condition="text", text_dim=0)
    keys = set(
        build_lpd(
            img_size=64,
            embed_dim=D,
            depth=1,
            num_heads=4,
            **{k: getattr(cfg, k) for k in ("condition", "text_dim", "max_text_tokens")},
        ).state_dict()
    )
    assert {"text.pos", "text.null", "text.proj.0.weight", "text.proj.2.weight"} <= keys
    assert not {"class_emb.weight", "fake_latent"} & keys
    assert not any(k.startswith("text.") for k in build_lpd(img_size=64, depth=1).state_dict())


@pytest.mark.parametrize("cfg, negative", [(1.0, False), (3.0, False), (3.0, True)])
@pytest.mark.parametrize("static", [False, True])
def test_teacher_forced_text_decoding_equals_the_training_pass(model, cfg, static, negative):
    """A batch of prompts of lengths 1..6; guidance rows: the null caption or a negative prompt
    (shorter than some captions, longer than others)."""
    features, mask, tokens, orders = captions(3, seed=1)
    neg, neg_mask = torch.randn(1, 4, C, generator=torch.Generator().manual_seed(2)), None
    decoder = Decoder(
        model, SamplingConfig(cfg=cfg), compile={"backend": "eager"} if static else False
    )
    prefix, prefix_mask = decoder.text_prefix(features, mask, (neg, neg_mask) if negative else None)
    assert prefix.shape == (3 * (1 + (cfg != 1)), L, D) and prefix_mask.shape == prefix.shape[:2]
    forced = torch.gather(tokens, 1, orders)
    for sizes in SIZES:
        got = decoder.logits(prefix, orders, sizes, forced, prefix_mask=prefix_mask)
        with torch.no_grad():
            want = model.logits(tokens, None, orders, sizes, text=features, cond_mask=mask)
            if cfg != 1.0:
                rows, rows_mask = model.text_prefix(neg if negative else None, batch=1)
                guide = model.logits(
                    tokens,
                    None,
                    orders,
                    sizes,
                    cond=rows.expand(3, -1, -1),
                    cond_mask=rows_mask.expand(3, -1),
                )
                want = torch.cat([want, guide])
        assert (got - want).abs().max().item() < 1e-5


def test_padded_caption_rows_change_no_logit(model):
    features, mask, tokens, orders = captions(4, seed=3)
    other = repad(features, mask, 4)
    with torch.no_grad():
        a = model.logits(tokens, None, orders, [4, 12], text=features, cond_mask=mask)
        b = model.logits(tokens, None, orders, [4, 12], text=other, cond_mask=mask)
        c = model.logits(tokens, None, orders, [4, 12], text=other)  # no mask: rows seen
    assert (a - b).abs().max().item() == 0.0 and (a - c).abs().max().item() > 1e-3
    decoder = Decoder(model, SamplingConfig(cfg=2.0, temperature=1.5))
    drawn = [
        decoder.decode(
            *decoder.text_prefix(f, mask)[:1],
            orders,
            [1, 3, 5, 7],
            prefix_mask=decoder.text_prefix(f, mask)[1],
            generator=torch.Generator().manual_seed(0),
        )
        for f in (features, other)
    ]
    assert torch.equal(*drawn)


def test_guidance_rows_are_the_null_caption_or_the_negative_prompt(model):
    features, mask, _, _ = captions(2, seed=5, length=3)
    decoder = Decoder(model, SamplingConfig(cfg=4.0))
    prefix, pmask = decoder.text_prefix(features, mask)
    rows, _ = model.text_prefix(features, mask)
    assert torch.equal(prefix[:2], rows) and torch.equal(pmask[:2], mask)
    assert torch.equal(prefix[2:, 0], model.text.null.detach().expand(2, -1))
    assert pmask[2:].tolist() == [[True, False, False]] * 2  # the null caption is one row
    neg = torch.randn(2, 5, C)  # longer than the captions: they are padded
    prefix, pmask = decoder.text_prefix(features, mask, neg)
    with torch.no_grad():
        assert torch.equal(prefix[2:], model.text_prefix(neg)[0])
    assert pmask[:2, 3:].any().item() is False and pmask[2:].all().item()
    with pytest.raises(ValueError, match="negative prompt needs guidance"):
        Decoder(model).text_prefix(features, mask, neg)


def test_caption_dropout_trains_the_null_caption(model):
    features, mask, tokens, orders = captions(3, seed=6)
    rows, rows_mask = model.text_prefix(None, batch=3)
    with torch.no_grad():
        null = model.logits(tokens, None, orders, [4, 12], cond=rows, cond_mask=rows_mask)
        caps = model.logits(tokens, None, orders, [4, 12], text=features, cond_mask=mask)
    model.train()
    try:
        for p, want in ((1.0, null), (0.0, caps)):
            model.label_drop_prob = p
            loss = model(tokens, None, orders, [4, 12], text=features, cond_mask=mask)
            ce = torch.nn.functional.cross_entropy(
                want.flatten(0, 1), torch.gather(tokens, 1, orders).flatten()
            )
            assert abs(loss.item() - ce.item()) < 1e-5  # no other dropout
        model.label_drop_prob = 0.5
        model(tokens, None, orders, [4, 12], text=features, cond_mask=mask).backward()
        assert model.text.null.grad.abs().sum() > 0 and model.text.proj[0].weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.label_drop_prob = 0.1
        model.eval()


def test_caption_feature_noise_is_seeded_scaled_and_only_in_training():
    """``text_noise`` a: training sees features + N(0, (a x row RMS)^2), drawn from the training
    generator after the dropout draws; padding rows stay zero; evaluation is untouched."""
    features, mask, tokens, orders = captions(3, seed=7)
    features = features * mask[..., None]  # padding rows are zero, as encoders give them
    noisy = text_model(0, vocab_size=24, text_dim=C, max_text_tokens=8, text_noise=0.5)
    seen = []
    noisy.text.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    args = (tokens, None, orders, [4, 12])
    with torch.no_grad():
        noisy.logits(*args, text=features, cond_mask=mask)
        noisy.train()
        for seed in (1, 1, 2):
            noisy(*args, torch.Generator().manual_seed(seed), text=features, cond_mask=mask)
    noisy.eval()
    assert torch.equal(seen[0], features)  # evaluation
    a, b, c = seen[1:]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[~mask], features[~mask])
    ratio = (a - features)[mask].std() / features[mask].pow(2).mean().sqrt()
    assert 0.4 < ratio < 0.6
    with pytest.raises(ValueError, match="text_noise must be a number >= 0"):
        LPDConfig(condition="text", text_noise=-1.0)
    with pytest.raises(ValueError, match="text_noise needs condition 'text'"):
        LPDConfig(text_noise=0.5)


def test_bad_inputs_are_refused(model):
    features, mask, tokens, orders = captions(2, seed=7)
    with pytest.raises(ValueError, match="caption features must be"):
        model.text_prefix(torch.zeros(2, 9, C))  # longer than max_text_tokens
    with pytest.raises(ValueError, match="caption features must be"):
        model.text_prefix(torch.zeros(2, 3, C + 1))
    with pytest.raises(ValueError, match="caption mask must be bool"):
        model.text_prefix(features, mask.long())
    with pytest.raises(ValueError, match="decodes captions"):
        Decoder(model).class_prefix(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="class-conditional"):
        build_lpd(img_size=64, embed_dim=D, depth=1, num_heads=4).text_prefix(features)


def _caption_folder(root, captions):
    """1024 px images (the palette tokenizer: a 64 x 64 token grid) with same-stem captions."""
    root.mkdir()
    for i, text in enumerate(captions):
        grey = np.kron(np.random.default_rng(i).integers(0, 4, (64, 64)) * 85, np.ones((16, 16)))
        Image.fromarray(np.repeat(grey[..., None], 3, -1).astype(np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(text, encoding="utf-8")
    return root


def test_text_model_on_the_64x64_grid_trains_resumes_and_samples(tmp_path):
    """main_cache.py --captions, main_train.py (a text model_config, caption dropout, EMA, token
    ids encoded on the fly), an exact resume, then sampling with the recorded encoder."""
    data = _caption_folder(tmp_path / "data", ["a small 3 in the top left"])
    cache = str(tmp_path / "cache")
    base = ["--tokenizer", "palette", "--img_size", "1024", "--num_workers", "0"]
    argv = ["--data_path", str(data), "--cached_path", cache, "--captions", "auto"]
    assert main_cache.main([*base, *argv, "--max_text_tokens", "8", "--device", "cpu"]) == 0
    arch = "{condition: text, text_dim: 256, max_text_tokens: 8, embed_dim: 16, depth: 1, "
    arch += "num_heads: 2, vocab_size: 4}"
    (tmp_path / "t2i.yaml").write_text(f"model: null\nmodel_config: {arch}\n")

    def run(out, epochs, *extra):
        flags = ["--config", str(tmp_path / "t2i.yaml"), *base, "--use_cached"]
        flags += ["--cached_path", cache, "--output_dir", str(tmp_path / out), "--batch_size", "1"]
        flags += ["--epochs", str(epochs), "--lr", "1e-2", "--warmup_epochs", "0", "--seed", "3"]
        flags += ["--group_sizes_list", "[1024]*4", "--ema_decay", "0.9", "--device", "cpu"]
        assert main_train.main([*flags, "--save_every_epochs", "0", *extra]) == 0
        return torch.load(tmp_path / out / "checkpoint-last.pth", weights_only=True)

    whole = run("whole", 2)
    run("split", 1)
    resumed = run("split", 2, "--resume", str(tmp_path / "split"))
    for key in ("model", "model_ema"):
        assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key])
    assert whole["model_config"]["text_encoder"] == make_text_encoder("wordllama").record
    assert {"text.null", "text.pos"} <= set(whole["model"])
    model = load_lpd(str(tmp_path / "whole" / "checkpoint-last.pth"))
    encoder = make_text_encoder("wordllama", max_text_tokens=8)
    check_encoder_record(model.config.text_encoder, encoder)
    ids, mask, _ = encoder.tokenize(["a bold seven", "a 3"])
    decoder = Decoder(model, SamplingConfig(cfg=3.0))
    prefix, prefix_mask = decoder.text_prefix(encoder.encode(ids, mask), mask)
    orders = torch.stack(
        [torch.randperm(4096, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    )
    tokens = decoder.decode(prefix, orders, [1024] * 4, prefix_mask=prefix_mask)
    assert tokens.shape == (2, 4096) and tokens.min() >= 0 and tokens.max() < 4
    images = make_tokenizer("palette").decode(tokens.reshape(2, 64, 64))
    assert images.shape == (2, 3, 1024, 1024)


@pytest.mark.parametrize("px", [256, 512, 1024])
def test_staged_recipes_parse(px):
    config = main_train.parse_config(["--config", f"{ROOT}/configs/train_t2i_{px}.yaml"])
    config.validate()
    arch = LPDConfig.from_name(config.model, px, **config.model_config)
    assert (arch.condition, arch.text_dim, arch.max_text_tokens, arch.grid_size) == (
        "text",
        2048,
        120,
        px // 16,
    )
    assert parse_schedule_list(config.group_sizes_list, px, arch.num_tokens)
    assert (config.pretrained_ckpt is None) == (px == 256) and config.eval_freq == 0


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A tiny wordllama text model on the 4 x 4 palette grid, saved as training saves it."""
    net = text_model(1, vocab_size=4, text_dim=256, max_text_tokens=16)
    config = {**net.config.to_dict(), "text_encoder": make_text_encoder("wordllama").record}
    path = str(tmp_path_factory.mktemp("t2i") / "checkpoint-last.pth")
    args = {"tokenizer": "palette", "cfg": 2.0, "model": None}
    save_checkpoint({"model": net.state_dict(), "model_config": config, "args": args}, path)
    return path


def test_pipeline_prompts_match_the_decoder(text_checkpoint):
    pipe = LPDPipeline.from_pretrained(checkpoint=text_checkpoint, device="cpu")
    prompts = ["a bold seven in the top left", "a 3"]
    images = pipe(prompts=prompts, steps=4, seed=5, temperature=1.5)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, pipe(prompts=prompts, steps=4, seed=5, temperature=1.5))
    negative = pipe(prompts=prompts, negative_prompt="blurry", steps=4, seed=5, temperature=1.5)
    # the same draw by hand: the recorded encoder, the negative prompt's guidance rows
    encoder = make_text_encoder("wordllama", max_text_tokens=16)
    sampling = pipe.sampling(4, temperature=1.5)
    assert sampling.cfg == 2.0  # the checkpoint's
    orders = OrderSource("lpd", group_sizes(64, 4), 4, seed=5, repulsion_threshold=2.0)
    ids, mask, _ = encoder.tokenize(prompts)
    neg_ids, neg_mask, _ = encoder.tokenize(["blurry"])
    decoder = Decoder(pipe.model, sampling)
    rows = torch.as_tensor(orders.rows(np.arange(2)))

    def by_hand(neg):
        gens = [torch.Generator().manual_seed(image_seed(5, i)) for i in range(2)]
        prefix, prefix_mask = decoder.text_prefix(encoder.encode(ids, mask), mask, neg)
        tokens = decoder.decode(
            prefix, rows, group_sizes(64, 4), prefix_mask=prefix_mask, generator=gens
        )
        raster = torch.empty_like(tokens).scatter_(1, rows, tokens)
        return decode_tokens(pipe.tokenizer, raster, sampling)

    assert np.array_equal(images, by_hand(None))  # guided by the null caption
    assert np.array_equal(negative, by_hand((encoder.encode(neg_ids, neg_mask), neg_mask)))
    with pytest.raises(ValueError, match="takes --prompt"):
        pipe([1, 2], steps=4)
    with pytest.raises(ValueError, match="takes --prompt"):
        pipe([1], prompts=["a 3"], steps=4)
    with pytest.raises(ValueError, match="negative prompt needs guidance"):
        pipe(prompts=prompts, negative_prompt="x", steps=4, cfg=1.0)
    with pytest.raises(ValueError, match="give one or more prompts"):
        pipe(prompts=[], steps=4)
    pipe.model.config = replace(
        pipe.model.config, text_encoder={**pipe.model.config.text_encoder, "digest": "0" * 64}
    )
    with pytest.raises(ValueError, match="made with the text encoder"):
        LPDPipeline(pipe.model, pipe.tokenizer)(prompts=prompts, steps=4, cfg=2.0)


def test_pipeline_command_line_prompts(text_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "grid.png")
    argv = ["--pretrained_ckpt", text_checkpoint, "--steps", "4", "--output", out]
    argv += ["--device", "cpu", "--negative_prompt", "blurry"]
    assert pipeline_main([*argv, "--prompt", "a 3", "--prompt", "a bold seven"]) == 0
    assert "prompts ['a 3', 'a bold seven']" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert height == 64 and width >= 128  # two images side by side
    assert pipeline_main([*argv, "--labels", "1,2", "--overwrite"]) == 2
    assert "takes --prompt" in capsys.readouterr().err


@pytest.mark.timeout(1200)
def test_text_model_trains_under_ddp_and_fsdp_alike(tmp_path):
    """torchrun, 2 processes: DDP and FSDP2 train the text model (caption dropout, EMA) to the
    same weights, and both checkpoints record the encoder."""
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(["a 3", "a bold seven", "a small 1 in the top left", "eight"]):
        grey = np.random.default_rng(i).integers(0, 4, (4, 4)) * 85
        img = np.kron(grey, np.ones((16, 16)))[..., None].repeat(3, -1).astype(np.uint8)
        Image.fromarray(img).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(text, encoding="utf-8")
    cache, base = str(tmp_path / "cache"), ["--tokenizer", "palette", "--img_size", "64"]
    argv = [*base, "--data_path", str(data), "--cached_path", cache, "--captions", "auto"]
    assert main_cache.main([*argv, "--num_workers", "0", "--device", "cpu"]) == 0
    arch = "{condition: text, text_dim: 256, embed_dim: 16, depth: 2, num_heads: 2, vocab_size: 4}"
    (tmp_path / "t2i.yaml").write_text(f"model: null\nmodel_config: {arch}\n")
    flags = ["--config", str(tmp_path / "t2i.yaml"), *base, "--use_cached", "--cached_path", cache]
    flags += ["--batch_size", "1", "--epochs", "1", "--lr", "1e-2", "--warmup_epochs", "0"]
    flags += ["--group_sizes_list", "[1, 3, 12]", "--ema_decay", "0.9", "--num_workers", "0"]
    flags += ["--device", "cpu", "--save_every_epochs", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    weights = {}
    for mode in ("ddp", "fsdp"):
        out = str(tmp_path / mode)
        cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", f"{ROOT}/main_train.py", *flags]
        cmd += ["--output_dir", out, *(["--fsdp"] if mode == "fsdp" else [])]
        result = run_process(cmd, 900, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        model = load_lpd(os.path.join(out, "checkpoint-last" + (".pth" if mode == "ddp" else "")))
        assert model.config.text_encoder == make_text_encoder("wordllama").record
        weights[mode] = model.state_dict()
    for k, v in weights["ddp"].items():
        assert (v - weights["fsdp"][k]).abs().max().item() < 1e-5, k
