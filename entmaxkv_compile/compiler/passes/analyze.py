"""Decide, for every attention site of a graph, what the decode rewrite will do and why.

Statuses (what ``explain`` prints):

- ``rewritten``: an entmax decode step (query length proven 1) over a static cache written at a
  position tensor, whose mask and write index are proved from the graph for every position
  (``proofs.py``; some conditions become run-time guards) and numerically checked on the example
  inputs: becomes stats append + decode_step;
- ``bookkeeping``: an entmax prefill (query length > 1 or not provably 1): the attention stays, the
  page statistics of its cache are filled after the write (or, for a cache the graph allocates
  itself, by the first decode step that reads it);
- ``refused``: entmax attention the rewrite cannot take (the reason says which rule failed; a
  per-head alpha is refused unless every head's alpha is provably one constant, ``alpha.py``);
- ``not-entmax``: softmax, or a hand-written candidate the numeric check did not confirm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from ...config import EntmaxKVConfig
from .alpha import constant_alpha
from .ir import proves_equal, shape_of, where_of
from .match_attention import AttentionMatch, match_attention
from .match_entmax import WeightsSite, find_weight_sites
from .match_kv_write import LAZY_REASON
from .guards import row_start_from_mask
from .proofs import prove_decode_site
from .verify import check_decode_site, record, watched_nodes

REWRITTEN, BOOKKEEPING, REFUSED, NOT_ENTMAX = "rewritten", "bookkeeping", "refused", "not-entmax"

#: A prefill that allocates its cache inside the graph (transformers 5.x ``StaticCache``): the
#: statistics cannot be registered for a buffer that does not exist yet, but nothing is lost.
LAZY_PREFILL_REASON = (
    "query length is not 1: prefill keeps its attention; its KV cache is allocated inside this graph, "
    "so the page statistics are filled when the first decode step reads the cache"
)


@dataclass
class Site:
    """One attention site as reported to the user."""

    where: str
    kind: str
    alpha: Optional[float]
    status: str
    reason: str = ""
    phase: str = ""


@dataclass
class SitePlan:
    """A site the rewrite acts on, with what it needs."""

    site: Site
    match: AttentionMatch
    alpha: float
    slopes: Optional[torch.Tensor] = None
    guards: list[Any] = field(default_factory=list)  # run-time conditions of the rewrite (guards.py)
    per_row: bool = False  # a ragged decode step: one position per sequence (seqlens = positions + 1)
    row_start_mask: Optional[Node] = None  # a left-padded mask input: decode_step's row_start is read from it
    window: Optional[int] = None  # a proved sliding window: row_start = max(0, position - window + 1)
    rolling: Optional[Node] = None  # a rolling buffer: the position input, written at its value % slots


@dataclass
class Plan:
    """The analysis of one graph: every site, and the ones to rewrite or book-keep."""

    sites: list[Site] = field(default_factory=list)
    actions: list[SitePlan] = field(default_factory=list)

    @property
    def changes_graph(self) -> bool:
        return bool(self.actions)


def _kind(weights: WeightsSite) -> str:
    if weights.kind == "softmax":
        return "softmax"
    if weights.kind == "hand-written":
        return "hand-written entmax"
    return "entmax"


def analyze(gm: GraphModule, example_inputs: Optional[Sequence[Any]], config: EntmaxKVConfig,
            allow_guards: bool = False, mask_row_start: str = "example", paged: bool = True) -> Plan:
    """The :class:`Plan` for ``gm``; decode sites are checked on ``example_inputs`` when given.

    ``allow_guards``: the caller can check run-time guards before each call and fall back (the
    torch.compile backend); otherwise sites that need a guard on an input are refused.
    ``mask_row_start``: a mask input's leading hidden keys become ``decode_step``'s ``row_start``
    when the example mask hides some (``"example"``: left padding seen at compile time), or
    ``"always"`` (padding or a sliding window that only starts hiding keys after compile time).
    ``paged``: the caller can feed block-table caches (page pools read through a table input,
    ``match_paged.py``); otherwise such sites are refused.

    Without example inputs (a graph with no real tensors, e.g. under export) decode sites that
    pass every structural rule are reported ``refused`` with the reason that they could not be
    checked numerically: nothing unchecked is rewritten.
    """
    plan = Plan()
    decode: list[SitePlan] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    example = dict(zip(placeholders, example_inputs)) if example_inputs is not None else {}
    for weights in find_weight_sites(gm):
        anchor = weights.probs
        alpha = weights.alpha if weights.confirmed else None
        site = Site(where_of(anchor), _kind(weights), alpha, NOT_ENTMAX, weights.reason)
        plan.sites.append(site)
        if not weights.confirmed:
            continue
        match = match_attention(weights)
        per_head = constant_alpha(gm, weights.alpha_tensor, example) if weights.alpha_tensor is not None else None
        if per_head is not None:
            site.alpha = per_head.alpha
        alpha = float(site.alpha) if site.alpha is not None else 0.0
        if match.q is not None:
            site.phase = "decode" if _is_decode(match) else "prefill"
        if match.out is not None:
            site.where = where_of(match.out)
        reason = (PAGED_FRONT_DOOR_REASON if not paged and _reads_a_table(match) else "") or match.refusal or \
            (per_head.reason if per_head is not None else "") or _config_conflict(config, alpha) or \
            _paged_conflict(match, config)
        if reason == LAZY_REASON and site.phase == "prefill":  # nothing refused: decode fills the stats
            site.status, site.reason = BOOKKEEPING, LAZY_PREFILL_REASON
            continue
        if reason:
            site.status, site.reason = REFUSED, reason
            continue
        action = SitePlan(site, match, alpha)
        if per_head is not None and per_head.guard is not None and site.phase == "decode":
            action.guards.append(per_head.guard)  # a learned alpha may be updated in place later
        if site.phase == "prefill":
            site.status = BOOKKEEPING
            site.reason = "query length is not 1: prefill keeps its attention; page statistics are filled"
            plan.actions.append(action)
        elif not proves_equal(_numel(match.k.positions), 1) and not _per_row(match):
            site.status, site.reason = REFUSED, ("decode writes more than one position per step, and not one per row "
                                                 "(expected positions of shape [1], or [B] written as buf[arange(B), :, pos] or by scatter_)")
        else:
            action.per_row = not proves_equal(_numel(match.k.positions), 1)
            decode.append(action)
    _check_decode_sites(gm, example_inputs, decode, plan, allow_guards, mask_row_start == "always")
    _dedupe_bookkeeping(plan)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    plan.actions.sort(key=lambda a: order[a.match.out])
    return plan


def log_refused(sites: Sequence[Site], log: logging.Logger,
                consequence: str = "it keeps the model's dense attention") -> None:
    """A warning per refused site, with its reason and ``consequence``: a refused site keeps the
    model's (dense) attention, or under context parallel makes its graph raise, which must never
    happen silently."""
    for site in sites:
        if site.status == REFUSED:
            log.warning("entmaxkv: %s attention at %s not rewritten (%s): %s", site.kind, site.where, consequence,
                        site.reason)


def _is_decode(match: AttentionMatch) -> bool:
    shape = shape_of(match.q)
    return shape is not None and proves_equal(shape[2], 1)


def _per_row(match: AttentionMatch) -> bool:
    """Whether K and V are written one position per sequence (``buf[rows, :, pos]`` with ``pos [B]``,
    or a scatter index ``[B, H, 1, D]``); ``proofs.py`` proves it row by row before any rewrite."""
    batch = match.k.shape()[0] if match.k.shape() is not None else None

    def per_row(read: Any) -> bool:
        shape = shape_of(read.positions)
        if not shape or not _same(shape[0], batch):
            return False
        if read.table is not None:  # a paged write: position tensor [B, 1], row b at table row b
            return len(shape) == 2 and proves_equal(shape[1], 1)
        return read.scatter or (read.rows is not None and len(shape) == 1)

    return per_row(match.k) and per_row(match.v)


def _same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and proves_equal(a - b, 0)


def _numel(node: Optional[Node]) -> Any:
    shape = shape_of(node)
    if shape is None:
        return None
    total = 1
    for size in shape:
        total = total * size
    return total


#: A paged site met by a front door that cannot feed block-table caches (the offline rewrite).
PAGED_FRONT_DOOR_REASON = ("a paged KV cache (block table): this front door does not take block tables; "
                           "use the torch.compile backend")


def _reads_a_table(match: AttentionMatch) -> bool:
    return match.k.table is not None or match.v.table is not None


def _paged_conflict(match: AttentionMatch, config: EntmaxKVConfig) -> str:
    """Why a site read through a block table cannot be taken (empty when it can, or is not paged)."""
    k, v = match.k, match.v
    if k.table is None and v.table is None:
        return ""
    if k.table is None or v.table is None:
        return "only one of K and V is read through a block table"
    if k.table is not v.table:
        return f"K and V are read through different block tables ({k.table.name}, {v.table.name})"
    block = shape_of(k.cache)[1]
    if block != config.page_size or shape_of(v.cache)[1] != block:
        return (f"the page pool's block size ({block}) differs from the configured page_size "
                f"({config.page_size}): one page of statistics is one block; set page_size={block}")
    return ""


def _config_conflict(config: EntmaxKVConfig, alpha: float) -> str:
    if config.alpha is not None and abs(config.alpha - alpha) > 1e-9:
        return f"the model's entmax alpha {alpha:g} differs from the configured alpha {config.alpha:g}"
    return ""


def _check_decode_sites(gm: GraphModule, example_inputs, decode: list[SitePlan], plan: Plan,
                        allow_guards: bool, always_row_start: bool = False) -> None:
    """Prove each decode site from the graph (every position), then check it on the examples."""
    if not decode:
        return
    if example_inputs is None:
        for action in decode:
            action.site.status, action.site.reason = REFUSED, "no example inputs to check the decode step numerically"
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    example = dict(zip(placeholders, example_inputs))
    proved = []
    for action in decode:
        proof = prove_decode_site(gm, action.match, action.match.score_node, example, allow_guards, always_row_start)
        if proof.reason:
            action.site.status, action.site.reason = REFUSED, "not proved for every position: " + proof.reason
        else:
            action.guards = [*proof.guards, *(g for g in action.guards if g not in proof.guards)]
            action.row_start_mask, action.window, action.rolling = proof.row_start_mask, proof.window, proof.rolling
            notes = list(proof.notes)
            if action.match.weights.alpha_tensor is not None:
                notes.append(f"per-head alpha: every head's alpha is {action.alpha:.4g}")
            proved.append((action, notes))
    if not proved:
        return
    watch = [n for action, _ in proved for n in [*watched_nodes(action.match), action.rolling] if n is not None]
    values = record(gm, example_inputs, watch)
    for action, notes in proved:
        row_start = None
        if action.row_start_mask is not None:
            key_len, batch = action.match.k.shape()[2], values[action.match.q].shape[0]
            row_start = row_start_from_mask(example[action.row_start_mask], key_len, batch)
        slopes, why = check_decode_site(action.match, values, action.alpha, action.per_row, row_start,
                                        action.window, values.get(action.rolling))
        if why:
            action.site.status, action.site.reason = REFUSED, why
            continue
        action.slopes = slopes
        action.site.status = REWRITTEN
        table = action.match.k.table
        if table is not None:
            action.site.reason = (f"decode step -> paged_stats_append + decode_step(block_table={table.name}) (paged: "
                                  "the pools read through the table, statistics per physical block, "
                                  "seqlens = each row's position + 1)")
        elif action.rolling is not None:
            action.site.reason = "decode step -> page_stats_rebuild + decode_step (rolling buffer)"
        else:
            action.site.reason = "decode step -> page_stats_append + decode_step"
        if action.per_row and table is None:
            action.site.reason += " (per-row positions: seqlens = positions + 1 for each sequence)"
        if slopes is not None:
            action.site.reason += " (ALiBi slopes recovered)"
        if action.match.softcap:
            action.site.reason += f" (logit soft-cap {action.match.softcap:g})"
        if notes:
            action.site.reason += "; " + "; ".join(notes)
        plan.actions.append(action)


def _dedupe_bookkeeping(plan: Plan) -> None:
    """Two sites reading one cache in one graph must not both fold the same row into its stats."""
    phases: dict[tuple[Node, Optional[int]], set[str]] = {}
    for action in plan.actions:
        phases.setdefault(action.match.k.key, set()).add(action.site.phase)
    for key, kinds in phases.items():
        if len(kinds) > 1:
            for action in plan.actions:
                if action.match.k.key == key:
                    action.site.status = REFUSED
                    action.site.reason = "one cache is read by both a decode and a prefill attention in one graph"
            plan.actions = [a for a in plan.actions if a.match.k.key != key]
