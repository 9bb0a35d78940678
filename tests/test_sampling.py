"""KV-cached parallel decoding: parity with the released sampler, teacher forcing, sampling rules."""

from __future__ import annotations

import pytest
import torch

from lpd.models import build_lpd
from lpd.sampling import (
    SamplingConfig,
    cfg_scales,
    filter_and_sample,
    sample_tokens,
    teacher_forced_logits,
)
from lpd.schedules import GroupSizeError


def parity_model(fx):
    model = build_lpd(**fx["config"])
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


@pytest.mark.parametrize("case", [0, 1, 2])
def test_greedy_sampling_reproduces_released_tokens(lpd_parity, case):
    fx = lpd_parity
    ref = fx["greedy_sampling"][case]
    model = parity_model(fx)
    tokens = sample_tokens(
        model,
        fx["labels"],
        fx["orders"],
        fx["group_sizes"],
        greedy=True,
        sampling=SamplingConfig(cfg=ref["cfg"], cfg_schedule=ref["cfg_schedule"]),
    )
    assert torch.equal(tokens, ref["tokens"])
    # top-k 1 is greedy too (the released sampler's setting for these vectors).
    tokens_k1 = sample_tokens(
        model,
        fx["labels"],
        fx["orders"],
        fx["group_sizes"],
        generator=torch.Generator().manual_seed(0),
        sampling=SamplingConfig(cfg=ref["cfg"], cfg_schedule=ref["cfg_schedule"], top_k=1),
    )
    assert torch.equal(tokens_k1, ref["tokens"])


def test_step_head_outputs_match_released(lpd_parity):
    fx = lpd_parity
    ref = fx["greedy_sampling"][1]  # cfg 3, linear: doubled batch
    model = parity_model(fx)
    got = teacher_forced_logits(
        model, ref["tokens"], fx["labels"], fx["orders"], fx["group_sizes"], cfg=ref["cfg"]
    )
    expected = torch.cat(ref["step_head_outputs"], dim=1)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def tiny_model(img_size=64, seed=0, **kw):
    torch.manual_seed(seed)
    return build_lpd(
        img_size=img_size, embed_dim=32, depth=2, num_heads=4, vocab_size=24, class_num=5, **kw
    ).eval()


def random_inputs(model, B, seed):
    g = torch.Generator().manual_seed(seed)
    N = model.num_tokens
    tokens = torch.randint(0, model.vocab_size, (B, N), generator=g)
    labels = torch.randint(0, model.class_num, (B,), generator=g)
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    return tokens, labels, orders


@pytest.mark.parametrize("sizes", [[1, 2, 3, 10], [4, 4, 8], [16], [1] * 16, [3, 1, 7, 5]])
@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_teacher_forced_decoding_equals_training_pass(sizes, cfg):
    model = tiny_model()
    tokens, labels, orders = random_inputs(model, 3, seed=len(sizes))
    got = teacher_forced_logits(model, tokens, labels, orders, sizes, cfg=cfg)
    with torch.no_grad():
        cond = model.logits(tokens, labels, orders, sizes)
        if cfg != 1.0:
            expected = torch.cat([cond, model.logits(tokens, None, orders, sizes)])
        else:
            expected = cond
    assert (got - expected).abs().max().item() < 1e-5


def test_sampling_is_deterministic_and_per_image_generators_are_batch_independent():
    model = tiny_model()
    _, labels, orders = random_inputs(model, 4, seed=1)
    sizes = [1, 3, 5, 7]
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]  # noqa: E731
    a = sample_tokens(
        model,
        labels,
        orders,
        sizes,
        generator=gens(),
        sampling=SamplingConfig(cfg=2.0, temperature=1.0),
    )
    b = sample_tokens(
        model,
        labels,
        orders,
        sizes,
        generator=gens(),
        sampling=SamplingConfig(cfg=2.0, temperature=1.0),
    )
    assert torch.equal(a, b)
    # Image 2 decoded alone (its own generator) is the same image.
    alone = sample_tokens(
        model,
        labels[2:3],
        orders[2:3],
        sizes,
        generator=[torch.Generator().manual_seed(102)],
        sampling=SamplingConfig(cfg=2.0),
    )
    assert torch.equal(alone[0], a[2])
    c = sample_tokens(
        model,
        labels,
        orders,
        sizes,
        generator=torch.Generator().manual_seed(5),
        sampling=SamplingConfig(cfg=2.0),
    )
    assert c.shape == (4, 16) and c.min() >= 0 and c.max() < model.vocab_size


def test_tokens_come_back_in_raster_order():
    model = tiny_model()
    _, labels, orders = random_inputs(model, 2, seed=2)
    sizes = [1, 15]
    tok = sample_tokens(model, labels, orders, sizes, greedy=True)
    # Greedy decoding of the raster-ordered tokens through teacher forcing yields the same argmaxes.
    logits = teacher_forced_logits(model, tok, labels, orders, sizes)
    assert torch.equal(logits.argmax(-1), torch.gather(tok, 1, orders))


def test_unconditional_sampling():
    model = tiny_model()
    _, _, orders = random_inputs(model, 2, seed=3)
    tok = sample_tokens(model, None, orders, [1, 15], generator=torch.Generator().manual_seed(0))
    assert tok.shape == (2, 16)
    with pytest.raises(ValueError, match="guidance needs labels"):
        sample_tokens(model, None, orders, [1, 15], sampling=SamplingConfig(cfg=2.0))


def test_cfg_scales():
    s = cfg_scales(3.0, "linear", 4, 7, 16, torch.device("cpu"))
    assert torch.allclose(s[:, 0], torch.tensor([1 + 2 * 4 / 16, 1 + 2 * 5 / 16, 1 + 2 * 6 / 16]))
    assert cfg_scales(3.0, "constant", 4, 7, 16, torch.device("cpu")) == 3.0


def test_filter_and_sample_matches_the_categorical_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    M = 40000
    u = torch.rand(M, generator=torch.Generator().manual_seed(0))
    draws = filter_and_sample(logits.expand(M, -1), u, temperature=1.0, top_k=0, top_p=1.0)
    freq = torch.bincount(draws, minlength=5).float() / M
    assert (freq - torch.softmax(logits[0], -1)).abs().max() < 0.01
    # Temperature sharpens.
    draws_t = filter_and_sample(logits.expand(M, -1), u, temperature=0.5, top_k=0, top_p=1.0)
    freq_t = torch.bincount(draws_t, minlength=5).float() / M
    assert (freq_t - torch.softmax(logits[0] / 0.5, -1)).abs().max() < 0.01


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    M = 20000
    u = torch.rand(M, generator=torch.Generator().manual_seed(1))
    k2 = filter_and_sample(logits.expand(M, -1), u, 1.0, 2, 1.0)
    assert set(k2.tolist()) == {0, 1}
    assert abs((k2 == 0).float().mean().item() - 0.5 / 0.8) < 0.02
    # top-p 0.7: smallest set reaching 0.7 is {0, 1} (0.5 < 0.7 <= 0.8).
    p = filter_and_sample(logits.expand(M, -1), u, 1.0, 0, 0.7)
    assert set(p.tolist()) == {0, 1}
    # top-p smaller than the largest probability keeps exactly one token.
    p1 = filter_and_sample(logits.expand(M, -1), u, 1.0, 0, 0.1)
    assert set(p1.tolist()) == {0}
    # temperature 0 behaves as argmax.
    t0 = filter_and_sample(logits.expand(M, -1), u, 0.0, 0, 1.0)
    assert set(t0.tolist()) == {0}


def test_top_k_ties_and_top_p_boundary_follow_the_released_sampler():
    """Top-k keeps every logit equal to the k-th; top-p keeps a token whose preceding mass is <= p."""
    M = 4000
    u = torch.rand(M, generator=torch.Generator().manual_seed(2))
    ties = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    assert set(filter_and_sample(ties.expand(M, -1), u, 1.0, 2, 1.0).tolist()) == {0, 1, 2}
    flat = torch.zeros(1, 4)  # probabilities exactly 0.25: preceding masses 0, 0.25, 0.5, 0.75
    assert len(set(filter_and_sample(flat.expand(M, -1), u, 1.0, 0, 0.5).tolist())) == 3
    assert len(set(filter_and_sample(flat.expand(M, -1), u, 1.0, 0, 0.49).tolist())) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_p=0.0), "top_p must be a finite number > 0"),
        (dict(top_p=1.5), "top_p must be a finite number > 0.0 and <= 1.0"),
        (dict(cfg=-1.0), "cfg must be"),
        (dict(cfg=float("nan")), "cfg must be"),
        (dict(temperature=-0.1), "temperature must be"),
        (dict(top_k=-3), "top_k must be"),
        (dict(cfg_schedule="cosine"), "cfg_schedule must be"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    model = tiny_model()
    _, labels, orders = random_inputs(model, 1, seed=0)
    with pytest.raises(ValueError, match=match):
        sample_tokens(model, labels, orders, [1, 15], SamplingConfig(**kwargs))


def test_bad_orders_and_group_sizes():
    model = tiny_model()
    _, labels, orders = random_inputs(model, 2, seed=0)
    bad = orders.clone()
    bad[1, 0] = bad[1, 1]
    with pytest.raises(ValueError, match="orders row 1 is not a permutation"):
        sample_tokens(model, labels, bad, [1, 15])
    with pytest.raises(ValueError, match=r"shape \[B, 16\]"):
        sample_tokens(model, labels, orders[:, :10], [1, 9])
    with pytest.raises(GroupSizeError, match="sum to 14"):
        sample_tokens(model, labels, orders, [1, 13])
    with pytest.raises(ValueError, match="labels must be in"):
        sample_tokens(model, torch.tensor([0, 9]), orders, [1, 15])


def test_bf16_autocast_runs_and_mostly_agrees():
    model = tiny_model()
    _, labels, orders = random_inputs(model, 2, seed=4)
    sizes = [1, 3, 12]
    ref = sample_tokens(model, labels, orders, sizes, greedy=True, sampling=SamplingConfig(cfg=2.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sample_tokens(
            model, labels, orders, sizes, greedy=True, sampling=SamplingConfig(cfg=2.0)
        )
    assert low.shape == ref.shape
    assert (low == ref).float().mean() > 0.5


def test_model_mode_is_restored():
    model = tiny_model()
    model.train()
    _, labels, orders = random_inputs(model, 1, seed=0)
    sample_tokens(model, labels, orders, [16], greedy=True)
    assert model.training


def test_sampling_flags_parse_into_the_config():
    import argparse

    from lpd.sampling import SamplingConfig, add_sampling_args, sampling_from_args

    p = argparse.ArgumentParser()
    add_sampling_args(p)
    assert sampling_from_args(p.parse_args([])) == SamplingConfig()
    argv = (
        "--cfg 4.5 --cfg_schedule constant --temperature 0.5 --top_k 7 --top_p 0.9 --order random "
        "--proximity_threshold 2.5 --repulsion_threshold 3.0 --bf16 --decode_fp32"
    ).split()
    assert sampling_from_args(p.parse_args(argv)) == SamplingConfig(
        cfg=4.5,
        cfg_schedule="constant",
        temperature=0.5,
        top_k=7,
        top_p=0.9,
        order="random",
        proximity_threshold=2.5,
        repulsion_threshold=3.0,
        bf16=True,
        decode_fp32=True,
    )
    assert sampling_from_args(p.parse_args(["--order", "raster", "--no-bf16"])).order == "raster"
    for bad in (
        ["--order", "spiral"],
        ["--cfg_schedule", "cosine"],
        ["--top_k", "1.5"],
        ["--cfg", "x"],
    ):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    help_text = " ".join(p.format_help().split())
    for text in (
        "tau_r: 2 for the released 256 px settings",
        "linear or constant",
        "decode the VQ in float32",
    ):
        assert text in help_text
    # defaults: a config, or changes to the defaults (None: decided later); excluded flags are absent
    q = argparse.ArgumentParser()
    add_sampling_args(q, SamplingConfig(cfg=3.0, order="raster"))
    assert sampling_from_args(q.parse_args([])) == SamplingConfig(cfg=3.0, order="raster")
    r = argparse.ArgumentParser()
    add_sampling_args(r, {"cfg": None}, exclude=("bf16",))
    args = r.parse_args([])
    assert args.cfg is None and args.order == "lpd" and not hasattr(args, "bf16")
    with pytest.raises(SystemExit):
        r.parse_args(["--bf16"])
    assert sampling_from_args({"cfg": 2.0, "seed": 5}, top_k=3) == SamplingConfig(cfg=2.0, top_k=3)


def test_a_target_at_the_total_mass_takes_the_last_token_with_probability():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 5.0, 1.0, -1.0]])
    u = torch.ones(2)  # the largest target: rounding can put it at the total
    assert filter_and_sample(logits, u, 1.0, 2, 1.0).tolist() == [
        3,
        2,
    ]  # top-2: the last kept token
    assert filter_and_sample(logits, u, 1.0, 0, 1.0).tolist() == [3, 3]
    assert filter_and_sample(logits, u, 1.0, 0, 0.5).tolist() == [3, 1]  # top-p keeps [3] and [1]


def test_a_zero_target_never_takes_a_token_without_probability():
    """torch.rand can draw 0: the first token whose cumulative mass exceeds it, not one cut away."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    u = torch.zeros(2)
    assert filter_and_sample(logits, u, 1.0, 2, 1.0).tolist() == [2, 0]  # top-2 cuts 0, 1 / 2, 3
    assert filter_and_sample(logits, u, 1.0, 0, 0.5).tolist() == [3, 0]  # the most likely token
