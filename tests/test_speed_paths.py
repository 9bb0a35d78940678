"""The speed paths compute what the plain paths compute (issue 7); no timing here.

* the sampler's preallocated input buffer and broadcast CFG halves give the tokens of a plain
  concatenating reference loop, and the trimmed last block the logits of a full one;
* the static-shape step (``compile=...``) equals eager decoding, compiled by dynamo + AOT autograd
  here (inductor too: about 50 s of compilation on 2 cores with an empty cache), and a failing
  compiler falls back to eager decoding with a warning;
* flex attention (torch's CPU reference, forward only) equals the dense SDPA training pass;
* bf16 autocast decoding runs; the CPU linear, dropout and head + cross-entropy match torch's.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import lpd.devices
from lpd.models import build_lpd
from lpd.models.kernels import Dropout, Linear, linear_cross_entropy
from lpd.sampling import Decoder, SamplingConfig, sample_tokens, step_plan, teacher_forced_logits


def tiny_model(img_size: int = 64, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_lpd(
        img_size=img_size, embed_dim=32, depth=2, num_heads=4, vocab_size=24, class_num=5, **kw
    ).eval()


def inputs(model, B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    N = model.num_tokens
    tokens = torch.randint(0, model.vocab_size, (B, N), generator=g)
    labels = torch.randint(0, model.class_num, (B,), generator=g)
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    return tokens, labels, orders


SCHEDULES = [[1, 2, 3, 10], [1] * 16, [4, 4, 8], [3, 1, 7, 5]]


# ---------------------------------------------------------------------------------------------
# Reference decoder: the straightforward loop (concatenate, double by cat, run every block fully)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_decode(model, labels, orders, sizes, cfg, pick):
    """Plain KV-cached decoding; ``pick(logits [B, g, V], first, last)`` chooses the tokens."""
    B, N = orders.shape
    plan = step_plan(sizes, 1, "cpu")
    pos = model.pos_embed[0, 1:][orders]
    queries = model.z_proj_ln(model.mask_token + pos)
    cond = model.class_emb(labels)
    if cfg != 1.0:
        cond = torch.cat([cond, model.fake_latent.expand(B, -1)])
    prev = model.z_proj_ln(cond + model.pos_embed[0, 0]).unsqueeze(1)
    caches = model.new_cache(prev.shape[0], N + 1)
    out_tokens = torch.empty(B, N, dtype=torch.long)
    outs = []
    for k, g in enumerate(sizes):
        first, last = plan.spans[k]
        q = queries[:, first:last]
        if cfg != 1.0:
            q = torch.cat([q, q])
        x = torch.cat([prev, q], dim=1)
        for blk, cache in zip(model.blocks, caches):
            x = blk(x, plan.masks[k], cache, plan.pos[k])  # every row through every block
        out = model.head(model.norm(x[:, -g:]))
        outs.append(out)
        if cfg != 1.0:
            c, u = out[:B], out[B:]
            logits = u + (1.0 + (cfg - 1.0) * torch.arange(first, last, dtype=torch.float32) / N)[
                :, None
            ] * (c - u)
        else:
            logits = out
        chosen = pick(logits, first, last)
        out_tokens[:, first:last] = chosen
        prev = model.z_proj_ln(model.token_emb(chosen) + pos[:, first:last])
        if cfg != 1.0:
            prev = torch.cat([prev, prev])
    raster = torch.empty_like(out_tokens).scatter_(1, orders, out_tokens)
    return raster, torch.cat(outs, dim=1)


@pytest.mark.parametrize("sizes", SCHEDULES)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_buffered_decoding_matches_the_plain_loop(sizes, cfg):
    model = tiny_model()
    tokens, labels, orders = inputs(model, 3, seed=len(sizes))
    ref, ref_logits = reference_decode(
        model, labels, orders, sizes, cfg, lambda lg, a, b: lg.argmax(-1)
    )
    got = sample_tokens(model, labels, orders, sizes, greedy=True, sampling=SamplingConfig(cfg=cfg))
    assert torch.equal(got, ref)
    # Teacher forcing with the reference's tokens: the trimmed last block gives the same logits.
    tf = teacher_forced_logits(model, ref, labels, orders, sizes, cfg=cfg)
    assert (tf - ref_logits).abs().max().item() < 1e-5


def test_sampled_tokens_match_the_plain_loop_with_the_same_uniforms():
    from lpd.sampling import filter_and_sample

    model = tiny_model()
    _, labels, orders = inputs(model, 4, seed=7)
    sizes = [1, 3, 5, 7]
    u = torch.rand(4, 16, generator=torch.Generator().manual_seed(3))
    ref, _ = reference_decode(
        model,
        labels,
        orders,
        sizes,
        2.5,
        lambda lg, a, b: filter_and_sample(
            lg.reshape(-1, lg.shape[-1]), u[:, a:b].reshape(-1), 1.0, 0, 1.0
        ).view(4, b - a),
    )
    got = sample_tokens(
        model,
        labels,
        orders,
        sizes,
        generator=torch.Generator().manual_seed(3),
        sampling=SamplingConfig(cfg=2.5),
    )
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------
# Static shapes and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", SCHEDULES)
def test_static_plan_is_the_eager_plan_padded(sizes):
    eager, lay = step_plan(sizes, 1, "cpu"), step_plan(sizes, 1, "cpu", static=True)
    S = lay.slots
    rows = lay.masks[0].shape[0]
    assert S == 16 + 2 and eager.slots == 17 and lay.num_out == max(sizes)
    for k in range(len(sizes)):
        pad, T, kv_len = lay.pads[k], eager.masks[k].shape[0], eager.masks[k].shape[1]
        assert pad == rows - T and lay.masks[k].shape == (rows, S)
        assert torch.equal(lay.pos[k][pad:], eager.pos[k])
        assert (lay.pos[k][:pad] == S - 1).all()  # padding rows write the scratch slot
        assert not lay.masks[k][pad:, S - 1].any()  # ... that no real row reads
        assert torch.equal(lay.masks[k][pad:, :kv_len], eager.masks[k])
        assert not lay.masks[k][pad:, kv_len:].any()
        assert (
            lay.masks[k][:pad].sum(1).eq(1).all() and lay.masks[k][:pad, S - 1].all()
        )  # padding: itself only


def _static_outputs(model, tokens, labels, orders, sizes, cfg, compile):
    decoder = Decoder(model, SamplingConfig(cfg=cfg), compile=compile)
    logits = decoder.logits(
        decoder.class_prefix(labels, len(orders)), orders, sizes, torch.gather(tokens, 1, orders)
    )
    assert not decoder.compile_failed
    return logits


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_static_step_in_eager_equals_cached_decoding(cfg):
    model = tiny_model()
    tokens, labels, orders = inputs(model, 2, seed=5)
    for sizes in SCHEDULES:
        got = _static_outputs(model, tokens, labels, orders, sizes, cfg, {"backend": "eager"})
        expected = teacher_forced_logits(model, tokens, labels, orders, sizes, cfg=cfg)
        assert (got - expected).abs().max().item() < 1e-5


def test_compiled_sampler_equals_eager():
    """Dynamo + AOT autograd (functionalised cache writes) without a C++ compiler: seconds."""
    model = tiny_model()
    tokens, labels, orders = inputs(model, 3, seed=11)
    sizes = [1, 2, 3, 10]
    opts = {"backend": "aot_eager"}
    for cfg in (1.0, 3.0):
        eager = sample_tokens(
            model, labels, orders, sizes, greedy=True, sampling=SamplingConfig(cfg=cfg)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
            compiled = sample_tokens(
                model,
                labels,
                orders,
                sizes,
                greedy=True,
                compile=opts,
                sampling=SamplingConfig(cfg=cfg),
            )
            assert torch.equal(compiled, eager)
            gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
            a = sample_tokens(
                model, labels, orders, sizes, generator=gen(), sampling=SamplingConfig(cfg=cfg)
            )
            b = sample_tokens(
                model,
                labels,
                orders,
                sizes,
                generator=gen(),
                compile=opts,
                sampling=SamplingConfig(cfg=cfg),
            )
            assert torch.equal(a, b)
        logits = _static_outputs(model, tokens, labels, orders, sizes, cfg, opts)
        assert (
            logits - teacher_forced_logits(model, tokens, labels, orders, sizes, cfg=cfg)
        ).abs().max().item() < 1e-5


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler on the CPU",
)
def test_inductor_compiled_sampler_equals_eager():
    model = tiny_model()
    tokens, labels, orders = inputs(model, 3, seed=11)
    sizes = [1, 2, 3, 10]
    for cfg in (1.0, 3.0):
        eager = sample_tokens(
            model, labels, orders, sizes, greedy=True, sampling=SamplingConfig(cfg=cfg)
        )
        assert torch.equal(
            sample_tokens(
                model,
                labels,
                orders,
                sizes,
                greedy=True,
                compile=True,
                sampling=SamplingConfig(cfg=cfg),
            ),
            eager,
        )
        logits = _static_outputs(model, tokens, labels, orders, sizes, cfg, True)
        assert (
            logits - teacher_forced_logits(model, tokens, labels, orders, sizes, cfg=cfg)
        ).abs().max().item() < 1e-4


def test_failing_compiler_falls_back_to_eager_with_a_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    model = tiny_model()
    _, labels, orders = inputs(model, 2, seed=3)
    sizes = [1, 3, 12]
    eager = sample_tokens(
        model, labels, orders, sizes, greedy=True, sampling=SamplingConfig(cfg=2.0)
    )
    decoder = Decoder(
        model, SamplingConfig(cfg=2.0), greedy=True, compile={"backend": broken_backend}
    )
    with pytest.warns(RuntimeWarning, match="decoding eagerly with static shapes"):
        got = decoder.sample(labels, orders, sizes)
    assert torch.equal(got, eager) and decoder.compile_failed
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # one warning per decoder
        assert torch.equal(decoder.sample(labels, orders, sizes), eager)


def test_compile_option_is_validated():
    model = tiny_model()
    _, labels, orders = inputs(model, 1, seed=0)
    with pytest.raises(ValueError, match="compile must be"):
        sample_tokens(model, labels, orders, [16], compile=3)


# ---------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True])
def test_bf16_autocast_decoding_runs(static):
    model = tiny_model()
    _, labels, orders = inputs(model, 2, seed=9)
    opts = {"backend": "eager"} if static else False
    tok = sample_tokens(
        model,
        labels,
        orders,
        [1, 3, 12],
        autocast_dtype=torch.bfloat16,
        generator=torch.Generator().manual_seed(0),
        compile=opts,
        sampling=SamplingConfig(cfg=3.0),
    )
    assert tok.shape == (2, 16) and tok.dtype == torch.long
    assert tok.min() >= 0 and tok.max() < model.vocab_size
    greedy16 = sample_tokens(
        model,
        labels,
        orders,
        [1, 3, 12],
        greedy=True,
        autocast_dtype=torch.bfloat16,
        compile=opts,
        sampling=SamplingConfig(cfg=3.0),
    )
    greedy32 = sample_tokens(
        model, labels, orders, [1, 3, 12], greedy=True, sampling=SamplingConfig(cfg=3.0)
    )
    assert (greedy16 == greedy32).float().mean() > 0.5  # bf16 rounding may flip near-ties only


@pytest.mark.parametrize("native", [False, True])
def test_emulated_bf16_on_cpu_warns_once(monkeypatch, native):
    sampling = lpd.devices

    real = sampling.cpu_has_native_bf16()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None
    if flags is not None:  # the probe agrees with the CPU's own flags
        assert real == any(f in flags.split() for f in ("avx512_bf16", "amx_tile"))
    monkeypatch.setattr(sampling, "_WARNED", False)
    monkeypatch.setattr(sampling, "cpu_has_native_bf16", lambda: native)
    model = tiny_model()
    _, labels, orders = inputs(model, 1, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            sample_tokens(
                model, labels, orders, [4, 12], greedy=True, autocast_dtype=torch.bfloat16
            )
        sampling.warn_if_emulated_bf16("cpu", torch.float32)  # fp32: never a warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len([m for m in msgs if "bf16 on this CPU is emulated" in m]) == (0 if native else 1)


# ---------------------------------------------------------------------------------------------
# Training pass: flex attention, the trimmed last block, the CPU kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1, 2, 3, 10], [1] * 16, [16], [3, 1, 7, 5]])
def test_flex_attention_equals_dense_sdpa(sizes):
    model = tiny_model()
    tokens, labels, orders = inputs(model, 3, seed=2)
    with torch.no_grad():
        model.set_attn_impl("sdpa")
        dense = model.logits(tokens, labels, orders, sizes)
        model.set_attn_impl("flex")
        assert model.uses_flex("cpu")
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # "flex_attention called without torch.compile"
            flex = model.logits(tokens, labels, orders, sizes)
    assert (flex - dense).abs().max().item() < 1e-5


def test_attn_impl_selection():
    model = tiny_model()
    assert model.attn_impl == "auto" and not model.uses_flex("cpu")
    assert model.uses_flex("cuda")
    model.set_attn_impl("sdpa")
    assert not model.uses_flex("cuda")
    with pytest.raises(ValueError, match="attn_impl must be"):
        model.set_attn_impl("triton")
    model.set_attn_impl("flex")
    tokens, labels, orders = inputs(model, 1, seed=0)
    model.train()
    with pytest.raises(RuntimeError, match="no backward pass on the CPU"):
        model(tokens, labels, orders, [4, 12])


def test_prepacked_cpu_linear_equals_f_linear_and_follows_weight_changes():
    import copy

    torch.manual_seed(0)
    lin = Linear(512, 1024)
    for shape in ((1, 512), (12, 512), (2, 20, 512), (256, 512), (257, 512), (3, 7, 512)):
        x = torch.randn(*shape)
        with torch.no_grad():
            got = lin(x)
        ref = F.linear(x, lin.weight, lin.bias)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5)
    x = torch.randn(4, 512)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place, as an optimizer step or load_state_dict would
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-4)
        Linear.cpu_prepack = False
        try:
            assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        finally:
            Linear.cpu_prepack = True
    copy.deepcopy(lin)  # the packed copy is not part of the module
    assert set(lin.state_dict()) == {"weight", "bias"}
    x.requires_grad_(True)
    lin(x).sum().backward()  # with autograd: the plain path
    assert x.grad is not None


def test_cpu_dropout_keeps_one_minus_p_and_scales():
    torch.manual_seed(0)
    d = Dropout(0.1).train()
    x = torch.ones(400_000, requires_grad=True)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows through the kept entries, scaled
    torch.manual_seed(1)
    a = d(x)
    torch.manual_seed(1)
    assert torch.equal(a, d(x))  # reproducible under the seed
    assert d.eval()(x) is x


def test_linear_cross_entropy_equals_torch():
    torch.manual_seed(0)
    x = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (50,))
    ours = linear_cross_entropy(x, w, targets)
    g_ours = torch.autograd.grad(ours, (x, w))
    ref = F.cross_entropy(F.linear(x, w), targets)
    g_ref = torch.autograd.grad(ref, (x, w))
    assert abs(ours.item() - ref.item()) < 1e-12
    assert all(torch.allclose(a, b) for a, b in zip(g_ours, g_ref))
    with torch.no_grad():
        assert abs(linear_cross_entropy(x, w, targets).item() - ref.item()) < 1e-12
    loss = linear_cross_entropy(x, w, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through it once"):
        loss.backward()


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_linear():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    targets = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(x, w, targets)
        ref = F.cross_entropy(F.linear(x, w).float(), targets)
    g_ours = torch.autograd.grad(ours, (x, w))
    g_ref = torch.autograd.grad(ref, (x, w))
    assert abs(ours.item() - ref.item()) < 1e-5
    assert all(
        a.dtype == torch.float32 and torch.allclose(a, b, atol=2e-2, rtol=2e-2)
        for a, b in zip(g_ours, g_ref)
    )


def test_training_step_grads_match_a_full_last_block():
    """The last block skips the context rows past their keys/values; gradients are unchanged."""
    model = tiny_model(proj_dropout=0.0, label_drop_prob=0.0)
    tokens, labels, orders = inputs(model, 2, seed=4)
    sizes = [1, 2, 3, 10]
    model.train()
    loss = model(tokens, labels, orders, sizes)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    # Reference: every block on every row, F.cross_entropy.
    targets = torch.gather(tokens, 1, orders)
    n_ctx = model.num_tokens - sizes[-1]
    x = torch.cat(
        [
            model.embed_prefix(model.embed_condition(labels, 2)),
            model.embed_tokens(targets[:, :n_ctx], orders[:, :n_ctx]),
            model.embed_queries(orders),
        ],
        dim=1,
    )
    mask = model.group_mask(sizes, x.device)
    for blk in model.blocks:
        x = blk(x, mask)
    logits = model.head(model.norm(x[:, -model.num_tokens :]))
    ref_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)
