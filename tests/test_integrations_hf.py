"""The Hugging Face path: ``register_entmax_attention`` + ``generate()`` with the ``entmaxkv`` backend.

Tiny random Llama and Qwen2 models built from local configs (nothing is downloaded), greedy
``generate()`` with a ``StaticCache`` through both documented ways of compiling, ``certified``
selection in fp32 compared with the uncompiled model; left-padded batches; graphs that record
autograd; and the docs snippet of docs/backend.md, executed as written.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from entmaxkv_compile.compiler.backend import AUTOGRAD_REASON  # noqa: E402
from entmaxkv_compile.compiler.explain import recording  # noqa: E402
from entmaxkv_compile.compiler.passes.match_kv_write import ROLLED_REASON  # noqa: E402
from entmaxkv_compile.integrations import (compile_config, entmax_attention, full_length_static_cache,  # noqa: E402
                                           register_entmax_attention)
from entmaxkv_compile.math.reference import entmax  # noqa: E402

STEPS = 16
OPTIONS = {"selector": "certified", "page_size": 4, "compiler": "eager"}  # pages of 4: selection matters
BACKEND_LOG = "entmaxkv_compile.compiler.backend"


def _llama(name: str, layers: int = 2) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    return _build(config, name)


def _qwen2(name: str) -> torch.nn.Module:
    config = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, use_sliding_window=False)
    return _build(config, name)


def _gemma2(name: str) -> torch.nn.Module:
    """Gemma-2 with its logit soft-cap (5: tight enough to change the output), global attention only."""
    config = transformers.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       query_pre_attn_scalar=16, max_position_embeddings=256,
                                       tie_word_embeddings=False, attn_logit_softcapping=5.0,
                                       layer_types=["full_attention"] * 2, sliding_window=256)
    return _build(config, name)


def _build(config, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name).eval()
    with torch.no_grad():  # larger q/k weights give peaked scores: a sparse entmax, as in trained models
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


MODELS = {"llama": (_llama, 1.5), "qwen2": (_qwen2, 1.25), "gemma2": (_gemma2, 1.5)}


def _model(family: str, **config: int) -> torch.nn.Module:
    build, alpha = MODELS[family]
    return build(register_entmax_attention(f"entmaxkv_test_{family}", alpha=alpha), **config)


def _prompt(batch: int = 1, length: int = 12, pad: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask; row ``i`` is left-padded with ``pad[i]`` tokens."""
    ids = torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    for row, count in enumerate(pad):
        ids[row, :count], mask[row, :count] = 0, 0
    return ids, mask


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, *, cache=None, steps: int = STEPS,
              **generation: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate()`` of ``steps`` tokens: ``(new tokens, logits [B, steps, V])``; ``cache``
    defaults to a ``StaticCache`` of 48 positions (none when ``cache_implementation`` is given)."""
    config = transformers.GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                           pad_token_id=0, eos_token_id=None, output_logits=True,
                                           return_dict_in_generate=True, **generation)
    if cache is None and "cache_implementation" not in generation:
        cache = transformers.StaticCache(config=model.config, max_cache_len=48)
    out = model.generate(ids, attention_mask=mask, cache=cache, generation_config=config)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def _compile_forward(model) -> None:
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="entmaxkv", options=OPTIONS, dynamic=False)


def _compiled_generation(model, way: str, **extra) -> dict:
    """``generate()``'s arguments for one way of compiling through the backend: the model's forward
    compiled by us (``"compiled_forward"``), or transformers' own compile from a ``CompileConfig``."""
    if way == "compiled_forward":
        _compile_forward(model)
        return {"disable_compile": True}
    torch._dynamo.reset()
    config = compile_config(OPTIONS)
    config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    return {"compile_config": config, **extra}


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the attention function


def test_attention_function_is_eager_attention_with_entmax():
    """GQA by num_key_value_groups, scaling and the additive mask, checked against a float64 spelling."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, keys, dim = 2, 4, 2, 3, 7, 8
    q = torch.randn(batch, heads, length, dim, generator=generator)
    k = torch.randn(batch, kv_heads, keys + 2, dim, generator=generator)  # the mask may be longer than the keys
    v = torch.randn(batch, kv_heads, keys + 2, dim, generator=generator)
    k, v = k[:, :, :keys], v[:, :, :keys]
    positions = torch.arange(length) + keys - length  # the queries are the last `length` keys
    causal = torch.arange(keys + 2)[None, :] > positions[:, None]
    mask = torch.zeros(batch, 1, length, keys + 2).masked_fill(causal, torch.finfo(torch.float32).min)
    mask[1, :, :, :2] = torch.finfo(torch.float32).min  # row 1 is left-padded by two keys
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.eval()

    out, weights = entmax_attention(1.5)(module, q, k, v, mask, 0.7)

    k64 = k.double().repeat_interleave(2, dim=1)
    v64 = v.double().repeat_interleave(2, dim=1)
    scores = q.double() @ k64.transpose(-1, -2) * 0.7 + mask[..., :keys].double()
    want_weights = entmax(scores, alpha=1.5, dim=-1)
    torch.testing.assert_close(weights.double(), want_weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double(), (want_weights @ v64).transpose(1, 2), atol=1e-5, rtol=0)
    assert out.shape == (batch, length, heads, dim)
    hidden = mask[..., :keys].expand_as(weights) < -1
    assert torch.all(weights[hidden] == 0)  # masked keys get weight exactly 0
    assert torch.all(weights[~hidden] >= 0) and (weights[~hidden] == 0).any()  # entmax: exact zeros


def test_registered_name_builds_an_entmax_model():
    """from_config(attn_implementation=name): every layer's weights are entmax (sum 1, exact zeros),
    causal and padding keys hidden by the registered mask function."""
    model = _model("llama")
    assert model.config._attn_implementation == "entmaxkv_test_llama"
    ids, mask = _prompt(batch=2, pad=(3, 0))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    real = mask[:, None, :, None].bool().expand(2, 4, 12, 12)  # queries of real tokens (padding rows see all)
    for weights in out.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 12), atol=1e-5, rtol=0)
        assert torch.all(weights.triu(diagonal=1)[real] == 0)  # no query sees a later key
        assert torch.all(weights[0, :, 3:, :3] == 0)  # no real token of the padded row sees the padding
        assert (weights.tril()[real] == 0).any()  # sparse among the visible keys
    sdpa = transformers.AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(sdpa(ids, attention_mask=mask).logits, out.logits, atol=1e-3)


def test_register_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="transformers' own attention"):
        register_entmax_attention("sdpa")
    with pytest.raises(ValueError, match="transformers' own attention"):
        register_entmax_attention("eager")
    with pytest.raises(ValueError, match="non-empty string"):
        register_entmax_attention("")
    with pytest.raises(ValueError, match="alpha"):
        register_entmax_attention("entmaxkv_test_bad", alpha=1.0)
    assert register_entmax_attention("entmaxkv_test_again", alpha=2.0) == "entmaxkv_test_again"
    assert register_entmax_attention("entmaxkv_test_again", alpha=1.5) == "entmaxkv_test_again"  # replaced
    module = torch.nn.Module()
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(NotImplementedError, match="s_aux"):
        entmax_attention(1.5)(module, q, q, q, None, 1.0, s_aux=torch.zeros(2))
    with pytest.raises(TypeError, match="additive float mask"):
        entmax_attention(1.5)(module, q, q, q, torch.ones(1, 1, 1, 1, dtype=torch.bool), 1.0)


def test_attention_soft_caps_the_scores_as_gemma2_before_the_mask():
    """Gemma-2 passes ``softcap=config.attn_logit_softcapping``: scores ``cap * tanh(s / cap)``,
    then the mask, then entmax."""
    module = torch.nn.Module()
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 8, generator=generator) * 3
    k = torch.randn(1, 2, 5, 8, generator=generator) * 3
    v = torch.randn(1, 2, 5, 8, generator=generator)
    mask = torch.zeros(1, 1, 1, 5)
    mask[..., 4] = torch.finfo(torch.float32).min  # a hidden key stays hidden
    out, weights = entmax_attention(1.5)(module, q, k, v, mask, 0.5, softcap=2.0)
    capped = 2.0 * torch.tanh((q @ k.transpose(2, 3)) * 0.5 / 2.0) + mask
    want = entmax(capped, alpha=1.5, dim=-1)
    torch.testing.assert_close(weights, want)
    torch.testing.assert_close(out, (want @ v).transpose(1, 2))
    assert weights[..., 4].eq(0).all()
    uncapped, _ = entmax_attention(1.5)(module, q, k, v, mask, 0.5)
    assert not torch.allclose(uncapped, out, atol=1e-3)


def test_compile_config_moves_the_mode_into_the_options():
    """torch.compile refuses CompileConfig's default mode next to options; compile_config() does not."""
    config = compile_config({"selector": "certified"}, mode="reduce-overhead")
    assert (config.backend, config.mode, config.dynamic) == ("entmaxkv", None, False)
    assert config.options == {"selector": "certified", "mode": "reduce-overhead"}
    torch.compile(lambda x: x + 1, **config.to_dict())  # accepted (torch checks mode and options here)
    with pytest.raises(RuntimeError, match="Either mode or options"):
        torch.compile(lambda x: x + 1, **transformers.CompileConfig(backend="entmaxkv", options={"a": 1}).to_dict())
    with pytest.raises(ValueError, match="mode given twice"):
        compile_config({"mode": "default"}, mode="reduce-overhead")
    assert compile_config().options is None


# ---------------------------------------------------------------------------------------- generate()


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("way", ["compiled_forward", "compile_config"])
def test_generate_certified_equals_uncompiled(family, way, caplog):
    """16 greedy tokens through the backend equal the uncompiled model's; every decode site
    rewritten, a compiled prefill labelled bookkeeping, and no site refused (nothing logged)."""
    model = _model(family)
    ids, mask = _prompt()
    want = _generate(model, ids, mask, disable_compile=True)
    generation = _compiled_generation(model, way, cache_implementation="static")
    with recording() as report, caplog.at_level(logging.WARNING, logger=BACKEND_LOG):
        got = _generate(model, ids, mask, **generation)
    _assert_same(got, want)
    decode = [site for site in report.sites if site.phase == "decode"]
    assert len(decode) == model.config.num_hidden_layers
    for site in decode:
        assert site.status == "rewritten", site.reason
        assert site.alpha == pytest.approx(MODELS[family][1])
        if family == "gemma2":
            assert "(logit soft-cap 5)" in site.reason
    prefill = [site for site in report.sites if site.phase == "prefill"]
    assert len(prefill) == (model.config.num_hidden_layers if way == "compiled_forward" else 0)
    assert all(site.status == "bookkeeping" for site in prefill), [site.reason for site in prefill]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [graph for graph in report.graphs if graph.changed]


def test_generate_bf16_gives_the_uncompiled_tokens():
    """bf16 Llama: the same greedy tokens as the uncompiled model (logits within bf16 rounding)."""
    model = _model("llama").to(torch.bfloat16)
    ids, mask = _prompt()
    want = _generate(model, ids, mask, disable_compile=True)
    _compile_forward(model)
    with recording() as report:
        got = _generate(model, ids, mask, disable_compile=True)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=2e-2, rtol=0)
    assert [site.status for site in report.sites if site.phase == "decode"] == ["rewritten"] * 2


@pytest.mark.parametrize("family", list(MODELS))
def test_left_padded_batch_decodes_exactly(family, caplog):
    """Batch 2, prompts of 12 and 8 tokens (left padding): the tokens equal the uncompiled model's.

    Every decode site is rewritten with decode_step's row_start read from the padding mask (and
    says so in ``explain``), certified, and no guard fails: nothing is logged or warned.
    """
    model = _model(family)
    ids, mask = _prompt(batch=2, pad=(0, 4))
    want = _generate(model, ids, mask, disable_compile=True)
    _compile_forward(model)
    with recording() as report, caplog.at_level(logging.WARNING, logger=BACKEND_LOG), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed guard warns: it must not happen here
        got = _generate(model, ids, mask, disable_compile=True)
    _assert_same(got, want)
    decode = [site for site in report.sites if site.phase == "decode"]
    assert len(decode) == model.config.num_hidden_layers
    for site in decode:
        assert site.status == "rewritten", site.reason
        assert "left padding: row_start" in site.reason
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_padded_batch_reusing_an_unpadded_graph_runs_the_models_attention():
    """A graph compiled on an unpadded batch, called with a padded one: its mask guard fails, the
    call warns and runs the model's attention, and the tokens stay those of the uncompiled model."""
    model = _model("qwen2")
    plain, plain_mask = _prompt(batch=2)
    padded, padded_mask = _prompt(batch=2, pad=(5, 0))
    want = _generate(model, padded, padded_mask, disable_compile=True)
    _compile_forward(model)
    _generate(model, plain, plain_mask, disable_compile=True)
    with pytest.warns(RuntimeWarning, match="run-time guard failed"):
        got = _generate(model, padded, padded_mask, disable_compile=True)
    _assert_same(got, want)


# ----------------------------------------------------------------------------- Mistral's sliding window

WINDOW = 10  # shorter than the prompts plus the new tokens: the window slides on every decode step


def _mistral(window: int = WINDOW) -> torch.nn.Module:
    name = register_entmax_attention("entmaxkv_test_mistral", alpha=1.5)
    config = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=False, sliding_window=window)
    return _build(config, name)


@pytest.mark.parametrize("way", ["compiled_forward", "compile_config"])
def test_mistral_sliding_window_generate_equals_uncompiled(way, caplog):
    """Mistral with sliding_window=10, batch 2 of 12 and 8 prompt tokens (left padding), 16 new
    tokens in a full-length StaticCache: the tokens equal the uncompiled model's (and those of
    transformers' own rolled window cache); every decode site is rewritten with row_start read
    from the mask, whose hidden prefix is the padding or the window's start; no guard fails."""
    model = _mistral()
    ids, mask = _prompt(batch=2, pad=(0, 4))
    want = _generate(model, ids, mask, cache=full_length_static_cache(model.config, 48), disable_compile=True)
    rolled = _generate(model, ids, mask, disable_compile=True)  # StaticCache: transformers' rolled window layers
    _assert_same(rolled, want)
    generation = _compiled_generation(model, way)
    with recording() as report, caplog.at_level(logging.WARNING, logger=BACKEND_LOG), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed guard warns: it must not happen here
        got = _generate(model, ids, mask, cache=full_length_static_cache(model.config, 48), **generation)
    _assert_same(got, want)
    decode = [site for site in report.sites if site.phase == "decode"]
    assert len(decode) == model.config.num_hidden_layers
    for site in decode:
        assert site.status == "rewritten", site.reason
        assert "row_start = the leading hidden keys of mask input" in site.reason
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]

    # the window matters on these steps: the same weights without it decode other logits
    unwindowed = _mistral(window=None)
    unwindowed.load_state_dict(model.state_dict())
    causal = _generate(unwindowed, ids, mask, disable_compile=True)
    assert (causal[1] - want[1]).abs().amax() > 1e-3


@pytest.mark.parametrize("mask_row_start", ["example", "always"])
def test_mistral_window_that_starts_sliding_after_compile_time(mask_row_start):
    """One unpadded 12-token prompt, window 20: at compile time (position 12) the mask hides nothing.
    With mask_row_start="example" the graph keeps the plain causal guard, which fails once the
    window slides (position 20): warned, the model's attention runs, exact. With "always" the
    window's start is row_start from the first call: no guard fails; the tokens are exact either way."""
    model = _mistral(window=20)
    ids, mask = _prompt(batch=1)
    want = _generate(model, ids, mask, cache=full_length_static_cache(model.config, 48), disable_compile=True)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="entmaxkv", dynamic=False,
                                  options={**OPTIONS, "mask_row_start": mask_row_start})
    with recording() as report, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        got = _generate(model, ids, mask, cache=full_length_static_cache(model.config, 48), disable_compile=True)
    _assert_same(got, want)
    decode = [site for site in report.sites if site.phase == "decode"]
    assert [site.status for site in decode] == ["rewritten"] * 2, [site.reason for site in decode]
    failed = [w for w in caught if "run-time guard failed" in str(w.message)]
    if mask_row_start == "always":
        assert not failed and all("row_start = the leading hidden keys" in site.reason for site in decode)
    else:
        assert failed and not any("row_start" in site.reason for site in decode)


def test_gemma2_alternating_window_layers_decode_exactly_in_a_full_length_cache():
    """Gemma-2 as released alternates sliding-window (10 keys here) and global layers, with its soft-cap:
    in a full-length cache both kinds are rewritten (the window layer's row_start from its own mask
    input), batch 2 left-padded, and the tokens equal the uncompiled model's."""
    config = transformers.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       query_pre_attn_scalar=16, max_position_embeddings=256,
                                       tie_word_embeddings=False, attn_logit_softcapping=5.0,
                                       layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW)
    model = _build(config, register_entmax_attention("entmaxkv_test_gemma2", alpha=1.5))
    ids, mask = _prompt(batch=2, pad=(0, 4))
    want = _generate(model, ids, mask, cache=full_length_static_cache(model.config, 48), disable_compile=True)
    _compile_forward(model)
    with recording() as report, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _generate(model, ids, mask, cache=full_length_static_cache(model.config, 48), disable_compile=True)
    _assert_same(got, want)
    decode = [site for site in report.sites if site.phase == "decode"]
    assert [site.status for site in decode] == ["rewritten"] * 2, [site.reason for site in decode]
    assert "sliding_attention" in decode[0].reason and "(logit soft-cap 5)" in decode[0].reason


def test_mistral_rolled_window_cache_is_refused_with_the_reason(caplog):
    """transformers' StaticCache keeps a sliding-window layer of `window` rows and, once full, rolls it
    whole every step: the decode sites are refused (the page statistics cannot follow), with the
    reason logged and the fix named; the tokens stay the uncompiled model's."""
    model = _mistral(window=8)
    ids, mask = _prompt(batch=2, pad=(0, 4))  # 12 tokens > 8: the window is full from the first step
    want = _generate(model, ids, mask, steps=3, disable_compile=True)
    _compile_forward(model)
    with recording() as report, caplog.at_level(logging.WARNING, logger=BACKEND_LOG):
        got = _generate(model, ids, mask, steps=3, disable_compile=True)
    _assert_same(got, want)
    decode = [site for site in report.sites if site.phase == "decode"]
    assert decode and all(site.status == "refused" and ROLLED_REASON in site.reason for site in decode)
    assert "full_length_static_cache" in ROLLED_REASON
    assert any("overwritten whole" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------------ autograd


def test_graph_recording_autograd_keeps_attention_and_differentiates(caplog):
    """Outside no_grad: the decode site is refused with the autograd reason (logged), the output and
    the gradients equal the uncompiled model's; the same step under no_grad is rewritten.

    One layer: called directly (not through generate(), which passes the mask it built), the model
    builds its mask from layer 0's cache counter, which the proofs cannot equate with the write
    index of later layers (those sites are refused for that reason, with or without autograd).
    """
    model, reference = _model("llama", layers=1), _model("llama", layers=1)
    ids, _ = _prompt(length=6)
    token = torch.tensor([[7]])

    def step(m, cache):
        m(ids, cache=cache, use_cache=True)
        return m(token, cache=cache, use_cache=True).logits

    want = step(reference, transformers.StaticCache(config=reference.config, max_cache_len=16))
    want.square().sum().backward()
    _compile_forward(model)
    with recording() as report, caplog.at_level(logging.WARNING, logger=BACKEND_LOG):
        got = step(model, transformers.StaticCache(config=model.config, max_cache_len=16))
    got.square().sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    grads = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, atol=1e-4, rtol=1e-4, msg=name)
    decode = [site for site in report.sites if site.phase == "decode"]
    assert decode and all(site.status == "refused" and site.reason == AUTOGRAD_REASON for site in decode)
    assert any(AUTOGRAD_REASON in record.getMessage() for record in caplog.records)

    with recording() as report, torch.no_grad():
        step(model, transformers.StaticCache(config=model.config, max_cache_len=16))
    decode = [site for site in report.sites if site.phase == "decode"]
    assert decode and all(site.status == "rewritten" for site in decode), [s.reason for s in decode]


# -------------------------------------------------------------------------------------------- docs


def test_docs_snippet_runs_as_written():
    """The python block of docs/backend.md's "Hugging Face transformers" section, executed as is."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "backend.md").read_text()
    section = text.split("## Hugging Face transformers", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch._dynamo.reset()
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exec(compile(code, "docs/backend.md", "exec"), namespace)
    decode = [site for site in namespace["report"].sites if site.phase == "decode"]
    assert decode and all(site.status == "rewritten" for site in decode), [s.reason for s in decode]
    tokens, tokens_2 = namespace["tokens"], namespace["tokens_2"]
    assert tokens.shape == (1, 6 + 16) and torch.equal(tokens, tokens_2)  # both ways, certified: same tokens


def test_docs_sliding_window_snippet_runs_as_written():
    """The Mistral block of docs/backend.md's "Sliding windows with transformers", executed as is:
    every decode site rewritten, the tokens those of the same model uncompiled."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "backend.md").read_text()
    section = text.split("**Sliding windows with transformers.**", 1)[1].split("**Autograd.**", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch._dynamo.reset()
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no guard may fail
        warnings.simplefilter("ignore", FutureWarning)
        exec(compile(code, "docs/backend.md", "exec"), namespace)
    decode = [site for site in namespace["report"].sites if site.phase == "decode"]
    assert decode and all(site.status == "rewritten" for site in decode), [s.reason for s in decode]
    model = namespace["model"]
    model.forward = model.forward._torchdynamo_orig_callable  # the uncompiled forward, same weights
    want = model.generate(namespace["prompt"], attention_mask=namespace["mask"], max_new_tokens=16, do_sample=False,
                          cache=full_length_static_cache(model.config, 64), pad_token_id=0)
    assert torch.equal(namespace["tokens"], want)
