"""The LPD transformer: parity with the released implementation, state-dict contract, training pass."""

from __future__ import annotations

import pytest
import torch

import lpd.models
from lpd.models import LPDConfig, build_lpd, group_visible_mask, lpd_tiny
from lpd.models.lpd import rotary_angles, rotate
from lpd.schedules import GroupSizeError


def parity_model(fx) -> torch.nn.Module:
    model = build_lpd(**fx["config"])
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def test_training_logits_match_released(lpd_parity):
    model = parity_model(lpd_parity)
    with torch.no_grad():
        logits = model.logits(
            lpd_parity["tokens"],
            lpd_parity["labels"],
            lpd_parity["orders"],
            lpd_parity["group_sizes"],
        )
    assert logits.shape == lpd_parity["train_logits_in_order"].shape
    assert (logits - lpd_parity["train_logits_in_order"]).abs().max().item() < 1e-5


def test_training_loss_matches_released(lpd_parity):
    model = parity_model(lpd_parity)
    with torch.no_grad():
        loss = model(
            lpd_parity["tokens"],
            lpd_parity["labels"],
            lpd_parity["orders"],
            lpd_parity["group_sizes"],
        )
    assert abs(loss.item() - lpd_parity["train_loss"].item()) < 1e-5


@pytest.mark.parametrize("name", ["lpd_l", "lpd_xl", "lpd_xxl"])
@pytest.mark.parametrize("img_size", [256, 512])
def test_presets_match_released_state_dict(manifest, name, img_size):
    with torch.device("meta"):
        model = getattr(lpd.models, name)(img_size=img_size)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == manifest[f"{name}_{img_size}"]


def test_preset_any_multiple_of_16_and_bad_sizes():
    with torch.device("meta"):
        model = lpd_tiny(img_size=384)
    assert model.pos_embed.shape == (1, 24 * 24 + 1, 64)
    with pytest.raises(ValueError, match="multiple of vqgan_stride"):
        build_lpd(img_size=250, embed_dim=64, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build_lpd(img_size=64, embed_dim=66, depth=1, num_heads=4)


def test_group_visible_mask_rules():
    sizes = [1, 2, 3]  # N = 6, context = 1 + 3 = 4 slots, queries 6
    m = group_visible_mask(sizes)
    assert m.shape == (10, 10)
    ctx_group = [0, 1, 2, 2]
    qry_group = [0, 1, 1, 2, 2, 2]
    for i, a in enumerate(ctx_group):
        for j, b in enumerate(ctx_group):
            assert m[i, j] == (b <= a)
        assert not m[i, 4:].any()
    for i, k in enumerate(qry_group):
        for j, b in enumerate(ctx_group):
            assert m[4 + i, j] == (b <= k)
        for j, k2 in enumerate(qry_group):
            assert m[4 + i, 4 + j] == (k2 == k)


def test_mask_is_built_once_per_schedule():
    model = build_lpd(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=16, class_num=4)
    a = model.group_mask([1, 3, 12], torch.device("cpu"))
    b = model.group_mask([1, 3, 12], torch.device("cpu"))
    assert a is b
    assert model.group_mask([1, 15], torch.device("cpu")) is not a


def small_batch(model, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = model.num_tokens
    tokens = torch.randint(0, model.vocab_size, (B, N), generator=g)
    labels = torch.randint(0, model.class_num, (B,), generator=g)
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    return tokens, labels, orders


def test_label_dropout_only_in_train_mode():
    model = build_lpd(
        img_size=64,
        embed_dim=32,
        depth=2,
        num_heads=2,
        vocab_size=16,
        class_num=4,
        label_drop_prob=1.0,
        proj_dropout=0.0,
    )
    tokens, labels, orders = small_batch(model)
    sizes = [1, 3, 12]
    with torch.no_grad():
        model.eval()
        cond = model(tokens, labels, orders, sizes)
        uncond_logits = model.logits(tokens, None, orders, sizes)
        model.train()
        dropped = model(tokens, labels, orders, sizes)  # every label dropped -> fake_latent
    expected = torch.nn.functional.cross_entropy(
        uncond_logits.reshape(-1, 16), torch.gather(tokens, 1, orders).reshape(-1)
    )
    assert torch.allclose(dropped, expected, atol=1e-6)
    assert not torch.allclose(cond, dropped)


@pytest.mark.parametrize("rope", [0.0, 1.0])
def test_gradient_checkpointing_same_loss_and_grads(rope):
    torch.manual_seed(0)
    model = build_lpd(
        img_size=64,
        embed_dim=32,
        depth=2,
        num_heads=2,
        vocab_size=16,
        class_num=4,
        label_drop_prob=0.0,
        proj_dropout=0.0,
        rope=rope,
    )
    tokens, labels, orders = small_batch(model)
    model.train()
    loss_a = model(tokens, labels, orders, [1, 5, 10])
    loss_a.backward()
    grads_a = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    loss_b = model(tokens, labels, orders, [1, 5, 10])
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b)
    for ga, p in zip(grads_a, model.parameters()):
        if ga is None:  # fake_latent: unused without label dropout
            assert p.grad is None
        else:
            assert torch.allclose(ga, p.grad, rtol=1e-4, atol=1e-6)


def test_rope_scores_depend_on_grid_offsets_only():
    """Rotated query-key products are the same for pairs of raster positions one grid shift apart;
    a prefix row (-1) is not turned, nor the channels past the rope share; the option adds no
    parameter and changes the logits."""
    g, d = 8, 16
    q, k = torch.randn(2, 1, 1, 1, d, dtype=torch.float64).unbind(0)

    def score(a: int, b: int) -> float:
        qa = rotate(q, rotary_angles(torch.tensor([[a]]), g, d))
        return float((qa * rotate(k, rotary_angles(torch.tensor([[b]]), g, d))).sum())

    at = lambda r, c: r * g + c  # noqa: E731
    base = score(at(1, 2), at(3, 1))
    assert abs(score(at(4, 6), at(6, 5)) - base) < 1e-5  # both moved 3 down, 4 right (float32)
    assert abs(score(at(1, 2), at(3, 2)) - base) > 1e-3 < abs(score(at(1, 3), at(3, 1)) - base)
    assert torch.equal(rotate(q, rotary_angles(torch.tensor([[-1]]), g, d)), q)
    part = rotate(q, rotary_angles(torch.tensor([[at(2, 3)]]), g, d // 2))
    assert torch.equal(part[..., d // 2 :], q[..., d // 2 :]) and not torch.equal(part, q)
    for bad in (1.0, 0.3, 1.5, "half"):  # heads of 6 channels: 1.0 turns 6, 0.3 1.8
        with pytest.raises(ValueError, match="rope must be in"):
            LPDConfig(embed_dim=24, num_heads=4, rope=bad)
    assert LPDConfig(embed_dim=24, num_heads=4, rope=2 / 3).rope
    torch.manual_seed(0)
    plain = build_lpd(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=16, class_num=4)
    rope = build_lpd(**{**plain.config.to_dict(), "rope": 0.5})
    rope.load_state_dict(plain.state_dict(), strict=True)
    tokens, labels, orders = small_batch(plain)
    with torch.no_grad():
        a, b = (m.eval().logits(tokens, labels, orders, [4, 12]) for m in (plain, rope))
    assert (a - b).abs().max() > 1e-3


def test_bad_training_inputs_have_clear_errors():
    model = build_lpd(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=16, class_num=4)
    tokens, labels, orders = small_batch(model)
    with pytest.raises(GroupSizeError, match="sum to 15"):
        model(tokens, labels, orders, [1, 2, 12])
    with pytest.raises(GroupSizeError, match="at least one token"):
        model(tokens, labels, orders, [1, 0, 15])
    with pytest.raises(ValueError, match=r"orders must have shape \[B, 16\]"):
        model(tokens, labels, orders[:, :8], [16])
    with pytest.raises(ValueError, match="tokens must have shape"):
        model(tokens[:2], labels, orders, [16])
    with pytest.raises(ValueError, match="labels must have shape"):
        model(tokens, labels[:1], orders, [16])


def test_weight_decay_groups():
    model = build_lpd(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=16, class_num=4)
    decay, no_decay = model.param_groups(0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decay_names and "head.weight" in decay_names
    assert "blocks.0.attn.qkv.bias" in no_decay_names and "norm.weight" in no_decay_names
    assert "z_proj_ln.weight" in no_decay_names
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_random_init_depends_only_on_generator():
    a = build_lpd(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=16, class_num=4)
    b = build_lpd(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=16, class_num=4)
    a.initialize_weights(torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    b.initialize_weights(torch.Generator().manual_seed(3))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
