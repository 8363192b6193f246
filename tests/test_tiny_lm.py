"""The tiny LM example: model shapes, decode step vs full forward, data split, checkpoint round trip,
the teacher-forced harness, and the committed entmax15 checkpoint (when present)."""

from __future__ import annotations

import pytest
import torch

from examples.tiny_lm.data import eval_windows, is_held_out, sample_batch
from examples.tiny_lm.model import (
    PRETRAINED_ENTMAX15,
    TinyLM,
    TinyLMConfig,
    alibi_slopes,
    attention_probs,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from examples.tiny_lm.teacher_forced import decode_positions, prefill



def small_model(alpha: float, n_heads: int = 6, n_kv_heads: int = 2, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    cfg = TinyLMConfig(d_model=40, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=8,
                       mlp_hidden=48, alpha=alpha)
    model = TinyLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so attention is far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def per_sequence_attend(model: TinyLM):
    """Dense attention for ``decode_positions``: ALiBi relative to each sequence's last token."""

    def attend(layer, q, k, v, seqlens):
        rel = (torch.arange(k.shape[2])[None, :] - (seqlens[:, None] - 1)).float()
        bias = model.slopes[None, :, None, None] * rel[:, None, None, :]
        return model.attend(q, k, v, bias.masked_fill(rel[:, None, None, :] > 0, float("-inf")))

    return attend


def test_alibi_slopes_even_heads_only():
    slopes = alibi_slopes(6)
    assert torch.all(slopes[1::2] == 0)
    assert torch.all(slopes[0::2] > 0)
    assert torch.all(slopes[0::2][1:] < slopes[0::2][:-1])  # geometric, decreasing


@pytest.mark.parametrize("bad", [dict(n_heads=6, n_kv_heads=4), dict(d_model=0), dict(alpha=0.5)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TinyLMConfig(**bad)


@pytest.mark.parametrize("alpha", [1.0, 1.25, 4 / 3, 1.5, 2.0])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (3, 1)])
def test_decode_step_matches_forward(alpha, heads):
    model = small_model(alpha, *heads, seed=int(alpha * 10) + heads[0])
    gen = torch.Generator().manual_seed(1)
    batch, length, capacity = 3, 23, 37  # odd sizes; the cache is larger than the sequence
    idx = torch.randint(0, 256, (batch, length), generator=gen)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch, capacity)
        steps = torch.stack([model.decode_step(idx[:, t], cache, t) for t in range(length)], dim=1)
    assert full.shape == (batch, length, 256) and full.dtype == torch.float32
    torch.testing.assert_close(steps, full, atol=2e-4, rtol=2e-4)


def test_entmax_attention_is_sparse_and_softmax_dense():
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    for alpha, expect_zeros in ((1.0, False), (1.5, True)):
        model = small_model(alpha)
        q, k, _ = model.blocks[0].qkv(model.embed(idx))
        pos = torch.arange(40)
        scores = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * model.scale + model.causal_bias(pos, pos)
        probs = attention_probs(scores, alpha)
        causal = torch.ones(40, 40, dtype=torch.bool).tril()
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6, 40))
        assert torch.all(probs[..., ~causal] == 0)
        assert bool((probs[..., causal] == 0).any()) == expect_zeros


def test_decode_step_rejects_bad_input():
    model = small_model(1.5)
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="pos"):
        model.decode_step(torch.zeros(2, dtype=torch.long), cache, 8)
    with pytest.raises(ValueError, match="token"):
        model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checkpoint_round_trip(tmp_path, dtype):
    model = small_model(1.5)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, {"steps": "7"})
    loaded, meta = load_checkpoint(path, dtype=dtype)
    assert meta["steps"] == "7" and loaded.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        expected = tensor.to(torch.float16).to(dtype)
        assert torch.equal(loaded.state_dict()[name], expected), name
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_held_out_split_is_stable_and_about_ten_percent():
    paths = [f"pkg{i}/mod{j}.py" for i in range(40) for j in range(25)]
    held = [p for p in paths if is_held_out(p)]
    assert 0.06 < len(held) / len(paths) < 0.14
    assert held == [p for p in paths if is_held_out(p)]


def test_sample_batch_targets_are_next_bytes():
    stream = torch.arange(200, dtype=torch.uint8)
    x, y = sample_batch(stream, 5, 17, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (5, 17)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    with pytest.raises(ValueError):
        sample_batch(stream, 1, 199, torch.Generator())


def test_eval_windows_take_long_files_in_order():
    held = [("a.py", b"x" * 10), ("b.py", b"y" * 50), ("c.py", b"z" * 30), ("d.py", b"w" * 40)]
    wins = eval_windows(held, 30, 2)
    assert [name for name, _ in wins] == ["b.py", "c.py"]
    assert all(w.shape == (30,) for _, w in wins)


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_teacher_forced_harness_matches_full_forward(alpha):
    model = small_model(alpha, seed=5)
    tokens = torch.randint(0, 256, (61,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, caches = prefill(model, tokens, chunk=16)  # 61 is not a multiple of the chunk
        torch.testing.assert_close(logits, model(tokens[None])[0], atol=1e-5, rtol=1e-5)
        positions = torch.tensor([0, 17, 44, 60])
        replay = decode_positions(model, tokens, caches, positions, per_sequence_attend(model))
    torch.testing.assert_close(replay, logits[positions], atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="positions"):
        decode_positions(model, tokens, caches, torch.tensor([61]), per_sequence_attend(model))


@pytest.mark.skipif(not PRETRAINED_ENTMAX15.is_file(), reason="committed checkpoint not present")
def test_committed_entmax_checkpoint_predicts_python():
    _, meta = load_checkpoint(PRETRAINED_ENTMAX15)
    assert "steps" in meta
    model = load_pretrained()
    assert model.cfg.alpha == 1.5 and model.cfg.n_heads == 6 and model.cfg.n_kv_heads == 2
    text = b"import os\nimport sys\n\n\ndef main():\n    for i in range(10):\n        print(i)\n" * 2
    tokens = torch.tensor(list(text))
    with torch.no_grad():
        logits = model(tokens[None, :-1])[0]
    bits = torch.nn.functional.cross_entropy(logits, tokens[1:]) / torch.log(torch.tensor(2.0))
    assert bits < 2.5, f"a trained model should predict simple Python well, got {bits:.2f} bits/byte"


def test_quality_softmax_attention_matches_model_attention():
    from benchmarks.quality import softmax_attention

    model = small_model(1.0, seed=7)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(4, 6, 1, 8, generator=gen)
    k = torch.randn(1, 2, 45, 8, generator=gen).expand(4, -1, -1, -1)
    v = torch.randn(1, 2, 45, 8, generator=gen).expand(4, -1, -1, -1)
    seqlens = torch.tensor([1, 17, 33, 45])  # ragged, with partial last pages
    out, probs = softmax_attention(q, k, v, seqlens, model.scale, model.slopes)
    expected = per_sequence_attend(model)(0, q, k, v, seqlens)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(probs[0, :, 1:] == 0) and torch.allclose(probs.sum(-1), torch.ones(4, 6))


@pytest.mark.parametrize("ranking", ["oracle", "topk-headnorm", "topk"])
def test_quality_page_rankings_respect_budget_and_length(ranking):
    from entmaxkv_compile.runtime.stats.reference import KVPageStats
    from entmaxkv_compile.runtime.select.reference import page_mask_from_indices

    from benchmarks.quality import rank_pages, softmax_attention

    model, page_size = small_model(1.5, seed=9), 4
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(3, 6, 1, 8, generator=gen) * 3
    k = torch.randn(3, 2, 37, 8, generator=gen)
    v = torch.randn(3, 2, 37, 8, generator=gen)
    seqlens = torch.tensor([37, 22, 5])
    stats = KVPageStats.from_cache(k, seqlens, page_size)
    _, p_full = softmax_attention(q, k, v, seqlens, model.scale, model.slopes)
    indices, num = rank_pages(ranking, q, stats, seqlens, p_full, 3 * page_size, page_size, model.scale,
                              model.slopes)
    mask = page_mask_from_indices(indices, num, stats.num_pages)
    valid_pages = (seqlens + page_size - 1) // page_size
    assert torch.all(num <= 3) and torch.all(num == torch.clamp(valid_pages, max=3)[:, None])
    assert torch.all(mask[torch.arange(3), :, valid_pages - 1])  # the last valid page is always kept
    past = torch.arange(stats.num_pages)[None, :] >= valid_pages[:, None]
    assert not mask[past[:, None, :].expand_as(mask)].any()
    if ranking == "oracle":  # the best non-forced page of the group (by page mass) is selected
        mass = torch.nn.functional.pad(p_full, (0, stats.num_pages * page_size - 37))
        mass = mass.view(3, 6, -1, page_size).sum(-1).view(3, 2, 3, -1).amax(2)
        mass[torch.arange(3), :, valid_pages - 1] = -1
        best = mass.argmax(-1)
        assert torch.all(mask.gather(-1, best[..., None]).squeeze(-1) | (valid_pages[:, None] == 1))


@pytest.mark.skipif(not PRETRAINED_ENTMAX15.is_file(), reason="committed checkpoint not present")
@pytest.mark.parametrize("selector", ["certified", "dense"])
def test_pretrained_certified_decode_is_exact_on_real_activations(selector):
    from entmaxkv_compile import EntmaxKVConfig
    from entmaxkv_compile.runtime.decode import sparse_decode

    model = load_pretrained()
    text = (b"class Stack:\n    def __init__(self):\n        self.items = []\n\n"
            b"    def push(self, item):\n        self.items.append(item)\n\n"
            b"    def pop(self):\n        return self.items.pop()\n" * 2)
    tokens = torch.tensor(list(text))
    config = EntmaxKVConfig(selector=selector, page_size=16, alpha=1.5)

    def attend(layer, q, k, v, seqlens):
        result = sparse_decode(q, k, v, seqlens, config, alibi_slopes=model.slopes, scale=model.scale)
        assert bool(result.certified.all())
        return result.out

    with torch.no_grad():
        logits, caches = prefill(model, tokens, chunk=64)
        positions = torch.tensor([len(text) - 41, len(text) - 17, len(text) - 1])  # ragged lengths
        replay = decode_positions(model, tokens, caches, positions, attend)
    torch.testing.assert_close(replay, logits[positions], atol=2e-4, rtol=2e-4)
