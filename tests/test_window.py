"""Sliding windows: masks that are graph inputs (the run-time guard takes the window's start as
row_start and rejects anything else), an in-graph window combined with a padding mask input, and
bf16 windowed decoding. The proofs and the zoo cover the in-graph windows themselves."""

from __future__ import annotations

import pytest
import torch

from entmaxkv_compile.compiler.explain import recording
from entmaxkv_compile.compiler.passes.guards import MaskGuard, row_start_from_mask
from examples.zoo import gpt_fast

OPTIONS = {"compiler": "eager", "selector": "certified", "certify_max_rounds": 1, "page_size": 4}
KEYS, HIDDEN = 32, torch.finfo(torch.float32).min


def _window_mask(pads, position, window, key_len=KEYS):
    """An HF-style additive decode mask ``[B, 1, 1, key_len]``: row ``b`` shows keys ``j`` with
    ``pads[b] <= j`` and ``position - window < j <= position`` (padding and a Mistral window)."""
    keys = torch.arange(key_len)[None, :]
    shown = (keys >= torch.tensor(pads)[:, None]) & (keys <= position) & (keys > position - window)
    return torch.where(shown, 0.0, HIDDEN)[:, None, None, :]


def _guard():
    position = torch.fx.symbolic_trace(torch.nn.Identity())
    return MaskGuard(0, KEYS, position, (1,), "test mask", prefix=True)


def test_prefix_guard_takes_a_window_and_its_start_is_row_start():
    """The window's start is the mask's leading hidden keys: max(padding, position - window + 1)."""
    mask = _window_mask([0, 9], 14, 6)
    assert _guard().holds((mask, torch.tensor([14])))
    assert row_start_from_mask(mask, KEYS, 2).tolist() == [9, 9]
    mask = _window_mask([0, 3], 20, 6)
    assert row_start_from_mask(mask, KEYS, 2).tolist() == [15, 15]


def _holed(mask):
    mask = mask.clone()
    mask[1, ..., 17] = HIDDEN  # a key inside the window hidden
    return mask


def _sink(mask):
    mask = mask.clone()
    mask[..., 0] = 0.0  # key 0 shown below the window (an attention sink)
    return mask


@pytest.mark.parametrize("bad", [
    _holed,
    _sink,
    lambda m: torch.where(torch.arange(KEYS) == 21, 0.0, m),  # off by one ahead: key position + 1 shown
    lambda m: torch.where(torch.arange(KEYS) == 20, HIDDEN, m),  # off by one behind: the key just written hidden
], ids=["hole", "sink", "one-ahead", "diagonal-hidden"])
def test_prefix_guard_rejects_masks_that_are_not_a_window(bad):
    mask = _window_mask([0, 3], 20, 6)
    assert _guard().holds((mask, torch.tensor([20])))
    assert not _guard().holds((bad(mask), torch.tensor([20])))


class _MaskInput(torch.nn.Module):
    """A static cache whose additive mask is an argument of the step; ``window`` > 0 also builds a
    sliding window in the graph (so the padding comes from the input, the window from the graph)."""

    def __init__(self, window: int = 0):
        super().__init__()
        self.window = window
        self.register_buffer("k", torch.randn(2, 2, KEYS, 8))
        self.register_buffer("v", torch.randn(2, 2, KEYS, 8))

    def forward(self, q, k_new, v_new, pos, mask):
        import entmax

        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        scores = q @ self.k.transpose(-2, -1) * 0.5 + mask
        if self.window:
            j = torch.arange(KEYS)
            scores = scores.masked_fill(pos - j >= self.window, float("-inf"))
        return entmax.entmax15(scores, dim=-1) @ self.v


def _step(pos, generator):
    return (torch.randn(2, 4, 1, 8, generator=generator)[:, :2], torch.randn(2, 2, 1, 8, generator=generator),
            torch.randn(2, 2, 1, 8, generator=generator), torch.tensor([pos]))


@pytest.mark.parametrize("bad", [_holed, _sink], ids=["hole", "sink"])
def test_window_mask_input_is_rewritten_and_a_mask_that_is_not_a_window_falls_back(bad):
    """Compiled on a window mask input (it hides a prefix), the site is rewritten with row_start from
    the mask; steps whose mask is a window stay exact; a mask with a hole or a sink fails the guard,
    warns, and runs the model's attention (exact)."""
    torch.manual_seed(0)
    eager, model = _MaskInput(), _MaskInput()
    model.load_state_dict(eager.state_dict())
    generator = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options=OPTIONS)
    with recording() as report:
        for pos in range(12, 22):
            args = _step(pos, generator)
            mask = _window_mask([0, 3], pos, 6)
            if pos == 21:
                mask = bad(mask)
                with pytest.warns(RuntimeWarning, match="additive mask input"):
                    got = compiled(*args, mask)
            else:
                got = compiled(*args, mask)
            torch.testing.assert_close(got, eager(*args, mask), atol=1e-6, rtol=0)
    [graph] = report.graphs
    [site] = graph.sites
    assert site.status == "rewritten" and "row_start = the leading hidden keys of mask input" in site.reason


def test_in_graph_window_and_padding_mask_input_take_the_later_start():
    """Padding from the mask input, the window from the graph: row_start is the later of the two
    (the padding for row 1 at first, the window's start afterwards); exact at every step."""
    torch.manual_seed(0)
    eager, model = _MaskInput(window=5), _MaskInput(window=5)
    model.load_state_dict(eager.state_dict())
    generator = torch.Generator().manual_seed(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options=OPTIONS)
    with recording() as report:
        for pos in range(8, 20):
            args = _step(pos, generator)
            mask = _window_mask([0, 7], pos, KEYS + 1)  # padding only: row 1 hides keys 0..6
            torch.testing.assert_close(compiled(*args, mask), eager(*args, mask), atol=1e-6, rtol=0)
    [graph] = report.graphs
    [site] = graph.sites
    assert site.status == "rewritten", site.reason
    assert "sliding window 5" in site.reason and "left padding: row_start" in site.reason


@pytest.mark.parametrize("args, seed", [(dict(window=7), 20), (dict(window=11, positions="per_row"), 5)],
                         ids=["shared", "ragged"])
def test_bf16_windowed_model_gives_the_uncompiled_tokens(args, seed):
    """bf16, a window shorter than the context: 16 certified greedy steps give the uncompiled tokens.

    The logits agree within bf16 rounding (~1e-2 here); a prompt whose greedy choice is a near-tie
    at that scale could flip a token either way, so the seeds are prompts without one (with a 96-token
    vocabulary most prompts have a tie below 0.016 somewhere in 16 steps of 2-3 rows).
    """
    model_args = gpt_fast.ModelArgs(n_layer=2, **args)
    batch = 3 if "positions" in args else 2
    reference, model = (gpt_fast.build(model_args, batch=batch, dtype=torch.bfloat16) for _ in range(2))
    prompt = torch.randint(1, 96, (batch, 14), generator=torch.Generator().manual_seed(seed))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options=OPTIONS)
    if "positions" in args:
        lengths = gpt_fast.ragged_lengths(batch, 14)
        want, want_logits = gpt_fast.generate_ragged(reference, prompt, lengths, 16)
        with recording() as report:
            got, logits = gpt_fast.generate_ragged(model, prompt, lengths, 16, decode=compiled)
    else:
        want, want_logits = gpt_fast.generate(reference, prompt, 16)
        with recording() as report:
            got, logits = gpt_fast.generate(model, prompt, 16, decode=compiled, prefill=compiled)
    decode = [site for site in report.sites if site.phase == "decode"]
    assert decode and all(s.status == "rewritten" and "sliding window" in s.reason for s in decode), decode
    assert torch.equal(got, want)
    torch.testing.assert_close(logits.float(), want_logits.float(), atol=5e-2, rtol=0)
