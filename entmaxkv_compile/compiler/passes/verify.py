"""Numeric checks of a matched decode site on the compile-time example inputs.

The structural matchers say *which* tensors are q, the K/V caches and the scores; this module
checks *what* they compute, by running the original graph once on the example inputs (mutated
inputs are cloned, so the caller's caches and counters are untouched) and comparing with the
contract of ``decode_step``:

- K and V read by the attention equal the cache buffers with query head ``h`` reading KV head
  ``h // G`` (catches tiled ``repeat`` GQA, which the kernels do not implement; a size-1 head axis
  the matmuls broadcast counts as read by every query head); the K and V parts of a fused
  ``kv[2, B, H, N, D]`` buffer are disjoint (the buffer has no internal overlap);
- the scores minus ``scale * q.k`` (soft-capped, ``cap * tanh(scale * q.k / cap)``, at a capped
  site) are, on the written positions ``j < L`` (``L`` per sequence in a
  ragged batch), ALiBi
  ``slope_h * (j - (L-1))`` up to a per-row constant (entmax is shift invariant), and at least
  ``1e3`` below the largest on ``j >= L`` (a causal static-cache mask); the slopes are recovered here;
- the attention output equals exact entmax attention of the model's own scores (as recorded,
  in the model's dtype) over the written rows. Comparing against scores recomputed in float64
  would refuse a correct bf16 model whenever its score rounding moves the entmax weights (large
  scores on long contexts): the rewrite scores in float32 and is the more exact of the two.

These checks hold for the example only. They run after ``proofs.py`` has proved the mask and the
write index for every position (a compiled graph is reused for every later step); they add what
the proof leaves to data: the GQA layout of the cache, the ALiBi slopes' values, the output.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from ...math import reference
from ...math.softcap import apply_softcap
from .ir import is_impure
from .match_attention import AttentionMatch
from .match_kv_write import row_positions
from .symbolic import FRESH, kind_of

_MASKED = -1e3


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, watch: set[Node], mutated_attrs: set[str]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.watch = watch
        self.values: dict[Node, Any] = {}
        self.mutated_attrs = mutated_attrs
        self.attr_copies: dict[str, Any] = {}

    def run_node(self, n: Node) -> Any:
        if n.op == "get_attr" and n.target in self.mutated_attrs:  # never write the module's buffers
            if n.target not in self.attr_copies:
                self.attr_copies[n.target] = self.fetch_attr(n.target).clone()
            value = self.attr_copies[n.target]
        else:
            value = super().run_node(n)
        if n in self.watch:
            self.values[n] = value
        return value


def mutated_inputs(gm: GraphModule) -> set[Node]:
    """Graph inputs and module attributes written in place by the graph (caches, counters)."""
    out = set()
    for node in gm.graph.nodes:
        if is_impure(node) and node.op not in ("placeholder", "output"):
            for parent in node.all_input_nodes[:1]:
                while parent.op in ("call_function", "call_method") and kind_of(parent) not in FRESH \
                        and parent.all_input_nodes:  # a write through a view (``kv[0].index_copy_``)
                    parent = parent.all_input_nodes[0]
                if parent.op in ("placeholder", "get_attr"):
                    out.add(parent)
    return out


def record(gm: GraphModule, example_inputs: Sequence[Any], nodes: Iterable[Node]) -> dict[Node, Any]:
    """Run ``gm`` once on the example inputs (mutated ones cloned) and keep ``nodes``' values."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mutated = mutated_inputs(gm)
    inputs = [
        x.clone() if isinstance(x, torch.Tensor) and node in mutated else x
        for node, x in zip(placeholders, example_inputs)
    ]
    attrs = {n.target for n in mutated if n.op == "get_attr"}
    recorder = _Recorder(gm, set(nodes), attrs)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def watched_nodes(match: AttentionMatch) -> list[Node]:
    return [n for n in (match.q, match.k_read, match.v_read, match.weights.scores, match.out,
                        match.k.logical or match.k.cache, match.v.logical or match.v.cache, match.k.positions)
            if n is not None]


def _cache_value(read: Any, values: dict[Node, Any]) -> torch.Tensor:
    """The ``[B, H, N, D]`` cache an operand reads: the buffer (or its part), or a paged read's
    logical cache as the graph gathered it."""
    return values[read.logical] if read.logical is not None else read.view(values[read.cache])


def check_decode_site(
    match: AttentionMatch, values: dict[Node, Any], alpha: float, per_row: bool = False,
    row_start: Optional[torch.Tensor] = None, window: Optional[int] = None,
    rolling: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], str]:
    """``(alibi_slopes or None, "")`` when the site computes decode_step's math, else ``(None, reason)``.

    ``per_row``: the step writes sequence ``b`` at its own position (``positions [B]``), so row
    ``b`` holds ``positions[b] + 1`` tokens; otherwise every row holds ``last position + 1``.
    ``row_start`` (int ``[B]``, a left-padded batch): row ``b`` attends only
    ``[row_start[b], length)``; its rows below the start must be hidden by the mask, and the
    checks run on the attended rows. ``window`` (a proved sliding window): row ``b`` attends only
    ``[max(row_start[b], length - window), length)``. ``rolling`` (a rolling buffer: the step's
    position, written at its value modulo the slot count): every row holds ``min(position + 1,
    slots)`` tokens.
    """
    q = values[match.q].double()
    k_read, v_read = values[match.k_read], values[match.v_read]
    k_cache, v_cache = _cache_value(match.k, values), _cache_value(match.v, values)
    if match.k.cache is match.v.cache and not has_no_internal_overlap(values[match.k.cache]):
        return None, "the fused K/V buffer's strides let elements share memory: its K and V parts are not disjoint"
    batch, q_heads, _, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != batch or q_heads % k_cache.shape[1]:
        return None, f"cache shape {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}"
    group = q_heads // k_cache.shape[1]
    # A single head left for the matmuls to broadcast (MQA without expand) is read by every query head.
    k_read, v_read = (t.expand(-1, q_heads, -1, -1) if t.dim() == 4 and t.shape[1] == 1 else t
                      for t in (k_read, v_read))
    if not (torch.equal(k_cache.repeat_interleave(group, 1), k_read)
            and torch.equal(v_cache.repeat_interleave(group, 1), v_read)):
        return None, "K/V read by the attention are not the cache with query head h reading KV head h // G"
    positions = values[match.k.positions]
    last = positions.reshape(-1)[-1:].to(torch.int64)
    lengths = row_positions(positions) + 1 if per_row else (last + 1).expand(batch)
    if rolling is not None:
        lengths = (rolling.reshape(-1)[-1:].to(torch.int64) + 1).clamp(max=k_cache.shape[2]).expand(batch)
    raw = apply_softcap(match.scale * (q @ k_read.double().transpose(-1, -2)), match.softcap)
    scores = values[match.weights.scores].double().reshape(raw.shape)
    v_read = v_read.double()
    low_precision = values[match.out].dtype in (torch.float16, torch.bfloat16)
    got = values[match.out].double().reshape(*raw.shape[:-1], v_read.shape[-1])
    found: Optional[torch.Tensor] = None
    starts = torch.zeros_like(lengths) if row_start is None else row_start.to(lengths)
    if window is not None:
        starts = torch.maximum(starts, lengths - window)
    # the rows that share a (start, length), checked together; the longest attended span last
    groups = sorted(set(zip(starts.tolist(), lengths.tolist())), key=lambda g: (g[1] - g[0], g))
    longest = groups[-1][1] - groups[-1][0]
    for start, length in groups:
        rows = ((lengths == length) & (starts == start)).nonzero().reshape(-1)
        if not 1 <= length <= k_cache.shape[2]:
            return None, f"the example writes at position {length - 1}, outside the cache"
        if start >= length:
            return None, f"the example's mask hides every written position of a row (start {start})"
        if start > 0 and not (scores[rows][..., :start] - scores[rows][..., start:length].amax(-1, keepdim=True)
                              < _MASKED).all():
            return None, "the mask does not hide the keys below the row's first attended key (left padding or window)"
        # A 1-token row shows no slope; in a ragged batch the longer rows give it (proofs.py proved
        # one bias expression for every row).
        fit = length - start >= 2 or longest < 2
        span = slice(start, None)
        slopes, why = _check_rows(match, scores[rows][..., span], raw[rows][..., span], v_read[rows][..., span, :],
                                  got[rows], length - start, alpha, low_precision, fit)
        if why:
            return None, why
        if not fit:
            continue
        slopes = torch.zeros(q_heads) if slopes is None else slopes
        # _fit_alibi's tolerance on these rows' visible scores (the spread it allows between rows)
        tol = (2e-2 if low_precision else 1e-4) * (1.0 + scores[rows][..., start:length].abs().max().item())
        if found is not None and (found - slopes).abs().max().item() > tol:
            return None, "the additive bias differs between sequences of the batch (not one ALiBi)"
        found = slopes  # the longest rows' fit last: the most accurate
    if match.softcap and found is not None and bool(found.any()):
        return None, ("an ALiBi bias added after the soft-cap: decode_step caps scale * q.k + ALiBi together "
                      "(a soft-capped site takes only a causal mask after the cap)")
    return (found if found is not None and bool(found.any()) else None), ""


def _check_rows(match: AttentionMatch, scores: torch.Tensor, raw: torch.Tensor, v_read: torch.Tensor,
                got: torch.Tensor, length: int, alpha: float, low_precision: bool,
                fit: bool = True) -> tuple[Optional[torch.Tensor], str]:
    """The mask, bias and output checks of the sequences (rows) that hold ``length`` tokens
    (``fit``: recover the ALiBi slopes from them)."""
    bias = scores - raw
    valid, hidden = bias[..., :length], bias[..., length:]
    if _hides_written_rows(valid):
        return None, "the mask hides positions already written (padding, a sliding window): not a causal static cache"
    if hidden.numel() and not (hidden - valid.amax(-1, keepdim=True) < _MASKED).all():
        return None, "the mask does not hide the cache rows past the current position"
    tol = (2e-2 if low_precision else 1e-4) * (1.0 + scores[..., :length].abs().max().item())
    slopes, why = _fit_alibi(valid, length, tol, match.has_bias) if fit else (None, "")
    if why:
        return None, why
    out = reference.entmax(scores[..., :length], alpha, -1) @ v_read[..., :length, :]
    err = (got - out).abs().max().item()
    if not err <= (3e-2 if low_precision else 1e-3) * (1.0 + out.abs().max().item()):
        return None, f"the rewritten step would differ from the model (max error {err:.3g})"
    return slopes, ""


def has_no_internal_overlap(buffer: torch.Tensor) -> bool:
    """Whether every element of ``buffer`` has its own memory (a sufficient test on the strides).

    Then two different indices on its leading axis (``kv[0]``, ``kv[1]``) are disjoint views. The
    stride test holds for every call: Dynamo guards an input's strides.
    """
    reach = 0
    dims = sorted((abs(stride), size) for size, stride in zip(buffer.shape, buffer.stride()) if size > 1)
    for stride, size in dims:
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def _hides_written_rows(valid: torch.Tensor) -> bool:
    """Whether some written row sits far below the line through the last (never masked) row with
    the median of the slopes from it to every other row.

    Measured against a line rather than the row maximum, so a steep ALiBi bias over a long context
    is not mistaken for a mask; the median slope, so the rounding of low-precision scores is not
    either: the slope through the last two rows alone carried their rounding (up to an ulp of
    the scores, 0.06 in bfloat16) into every row, and over 512k rows that is 3e4 below the line.
    A hidden row's slope is huge, so it cannot move the median unless most rows are hidden.
    """
    if valid.shape[-1] < 2:
        return False
    rel = valid - valid[..., -1:]
    j = torch.arange(valid.shape[-1], dtype=valid.dtype, device=valid.device) - (valid.shape[-1] - 1)
    ratios = rel[..., :-1] / j[:-1]
    slope = torch.nan_to_num(torch.nanmedian(torch.where(ratios.isfinite(), ratios, float("nan")),
                                             dim=-1, keepdim=True).values, nan=0.0)
    return bool((torch.nan_to_num(rel - slope * j, nan=float("-inf")) < _MASKED).any())


def _fit_alibi(valid: torch.Tensor, length: int, tol: float, has_bias: bool) -> tuple[Optional[torch.Tensor], str]:
    """Slopes ``[Hq]`` with ``bias_j - bias_last = slope_h * (j - (L-1))``; None when all zero."""
    if length < 2:
        if has_bias:
            return None, "cannot recover an additive bias from a 1-token context; compile after a longer prompt"
        return None, ""
    rel = valid - valid[..., -1:]
    j = torch.arange(length, dtype=torch.float64, device=valid.device) - (length - 1)
    slope = (rel * j).sum(-1, keepdim=True) / (j * j).sum()
    resid = (rel - slope * j).abs().max().item()
    spread = (slope - slope[:1]).abs().max().item()
    if resid > tol or spread > tol:
        return None, "the additive bias is not ALiBi slope * (j - i) (nor a causal mask)"
    slopes = slope[0, :, 0, 0]
    if slopes.abs().max().item() * length <= tol:
        return None, ""
    return slopes.to(torch.float32), ""
