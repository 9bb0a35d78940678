"""The text-conditional model: caption features become prefix rows; teacher-forced decoding equals
the training pass for prompts of different lengths, padded rows change nothing, guidance uses the
null caption or a negative prompt, caption dropout trains the null caption."""

from __future__ import annotations

import pytest
import torch

from lpd.models import LPDConfig, build_lpd
from lpd.sampling import Decoder, SamplingConfig

C, D, L = 12, 32, 6
SIZES = [[1, 2, 3, 10], [4, 4, 8], [16]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_lpd(
        img_size=64,
        embed_dim=D,
        depth=2,
        num_heads=4,
        vocab_size=24,
        condition="text",
        text_dim=C,
        max_text_tokens=8,
        proj_dropout=0.0,
    )
    with torch.no_grad():  # non-trivial caption rows: positions and the null caption
        m.text.pos.normal_(0, 0.5)
        m.text.null.normal_(0, 0.5)
    return m.eval()


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
