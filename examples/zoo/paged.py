"""A gpt-fast-style decoder whose KV cache is a page pool addressed by a block table (vLLM's layout).

Each attention module owns ``k_pool``/``v_pool`` buffers ``[num_blocks, page_size, Hkv, D]``;
``forward(idx, input_pos, block_table)`` takes the int32 table ``[B, max_pages]`` as an input,
as a serving engine does. The step's keys and values land in slot
``block_table[b, pos // P] * P + pos % P`` of the pool flattened to ``[num_blocks * P, Hkv, D]``
(vLLM's ``slot_mapping``); attention gathers each sequence's logical cache through the table,
``k_pool[block_table].reshape(B, max_pages * P, Hkv, D).transpose(1, 2)``, and then runs the
gpt-fast attention of :mod:`.gpt_fast` unchanged (the same GQA, masks and entmax spellings).

Knobs of :class:`PagedArgs` give the forms a backend must tell apart: where the table comes from
(a forward input, a module buffer, or built inside the step), how pages are gathered (in table
order, or reversed) and how the slot is written (through the table, or a buggy write ignoring it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import gpt_fast
from .gpt_fast import Attention, Block, ModelArgs, Transformer


@dataclass
class PagedArgs(ModelArgs):
    page_size: int = 16  # tokens per block (the backend's page size must equal it)
    spare_blocks: int = 3  # blocks in the pool beyond the batch's needs (never listed in the table)
    table: str = "input"  # input: forward's argument | buffer: a module buffer | arange: built in forward (identity)
    gather: str = "table"  # table: pool[block_table] | reversed: pool[block_table.flip(1)] (pages out of order)
    write: str = "index_put"  # index_put: pool.view(-1, H, D).index_put_((slot,), k) | index_copy: index_copy_(0,
    # slot, k) | setitem: flat[slot] = k | slice: index_put_ at block_table[:, input_pos // P] * P + input_pos % P
    # (positions [T] shared by the rows) | no_table: slot b * max_pages * P + pos (ignores the table: a bug)

    @property
    def max_pages(self) -> int:
        return -(-self.max_seq_len // self.page_size)


class PagedAttention(Attention):
    """gpt-fast attention over a paged cache: write through the table, gather, attend."""

    def setup_pool(self, num_blocks: int, dtype: torch.dtype, device: torch.device) -> None:
        a = self.args
        shape = (num_blocks, a.page_size, a.n_kv_head, a.head_dim)
        self.register_buffer("k_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def forward(self, x: torch.Tensor, freqs: Optional[torch.Tensor], input_pos: torch.Tensor,
                block_table: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = self._project(x, freqs)
        self._write(input_pos, block_table, k, v)
        k, v = self._gather(self.k_pool, block_table), self._gather(self.v_pool, block_table)
        q = q.transpose(1, 2)
        y = self._attend(q, self._expand(k), self._expand(v), input_pos)
        return self.wo(y.transpose(1, 2).reshape(batch, seqlen, self.args.n_head * self.args.head_dim))

    def _write(self, input_pos: torch.Tensor, block_table: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """vLLM's slot mapping: token ``pos`` of sequence ``b`` goes to row ``pos % P`` of block
        ``block_table[b, pos // P]``; ``input_pos`` is ``[T]`` (every row) or ``[B]`` (one per row)."""
        batch, seqlen, hkv, d = k.shape
        page = self.args.page_size
        pos = input_pos.view(-1, seqlen).expand(batch, seqlen)
        slot = (block_table.gather(1, pos // page).long() * page + pos % page).flatten()
        if self.args.write == "slice":  # the table's column per position, broadcast over the rows
            slot = (block_table[:, input_pos // page].long() * page + input_pos % page).flatten()
        elif self.args.write == "no_table":  # as if the pool were one contiguous cache per sequence
            rows = torch.arange(batch, device=pos.device).view(batch, 1)
            slot = (rows * (self.args.max_pages * page) + pos).flatten()
        for pool, new in ((self.k_pool, k), (self.v_pool, v)):
            flat = pool.view(-1, hkv, d)
            if self.args.write == "index_copy":
                flat.index_copy_(0, slot, new.reshape(-1, hkv, d))
            elif self.args.write == "setitem":
                flat[slot] = new.reshape(-1, hkv, d)
            else:
                flat.index_put_((slot,), new.reshape(-1, hkv, d))

    def _gather(self, pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """The logical cache ``[B, Hkv, max_pages * P, D]`` of every sequence, pages in table order."""
        table = block_table.flip(1) if self.args.gather == "reversed" else block_table
        pages = pool[table]  # [B, max_pages, P, Hkv, D]
        batch, max_pages, page, hkv, d = pages.shape
        return pages.reshape(batch, max_pages * page, hkv, d).transpose(1, 2)


class PagedBlock(Block):
    def __init__(self, args: PagedArgs) -> None:
        super().__init__(args)
        self.attention = PagedAttention(args)

    def forward(self, x, freqs, input_pos, block_table):
        h = x + self.attention(self.attention_norm(x), freqs, input_pos, block_table)
        return h + self.feed_forward(self.ffn_norm(h))


class PagedTransformer(Transformer):
    """:class:`~.gpt_fast.Transformer` with paged attention: the same parameters (a state dict of
    one loads into the other), so the two compute the same function of the tokens."""

    def __init__(self, args: PagedArgs) -> None:
        super().__init__(args)
        self.layers = nn.ModuleList(PagedBlock(args) for _ in range(args.n_layer))

    def setup_caches(self, batch: int, dtype: torch.dtype = torch.float32) -> None:
        a = self.args
        device = self.output.weight.device
        for layer in self.layers:
            layer.attention.setup_pool(batch * a.max_pages + a.spare_blocks, dtype, device)
        if a.table == "buffer":
            self.register_buffer("block_table", shuffled_table(batch, a).to(device), persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor,
                block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.args.table == "buffer":
            block_table = self.block_table
        elif self.args.table == "arange":  # the identity table, built inside the step
            max_pages = self.args.max_pages
            block_table = torch.arange(idx.shape[0] * max_pages, device=idx.device).view(-1, max_pages).int()
        freqs = self.freqs[input_pos] if self.args.rope else None
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs, input_pos, block_table)
        return self.output(self.norm(x))


def shuffled_table(batch: int, args: PagedArgs, seed: int = 5) -> torch.Tensor:
    """int32 ``[B, max_pages]``: distinct blocks of the pool in a random order (not the identity),
    some blocks left out, so a rewrite that ignored the table would read the wrong rows."""
    blocks = batch * args.max_pages + args.spare_blocks
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))
    return order[:batch * args.max_pages].view(batch, args.max_pages).to(torch.int32)


def _with_table(model: nn.Module, fn: Callable[..., torch.Tensor], table: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``fn(idx, input_pos)`` with the table passed, unless the model reads its own table buffer."""
    if model.args.table != "input":
        return fn
    return lambda idx, input_pos: fn(idx, input_pos, table)


@torch.no_grad()
def generate(model: PagedTransformer, prompt: torch.Tensor, steps: int,
             compiled: Optional[Callable[..., torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-fast's greedy loop (:func:`.gpt_fast.generate`, or its ragged form for ``per_row``
    positions) with the shuffled block table passed to every call; ``compiled`` defaults to ``model``."""
    table = shuffled_table(prompt.shape[0], model.args).to(prompt.device)
    step = _with_table(model, model if compiled is None else compiled, table)
    if model.args.positions == "per_row":
        lengths = gpt_fast.ragged_lengths(*prompt.shape)
        return gpt_fast.generate_ragged(_with_table(model, model, table), prompt, lengths, steps, decode=step)
    return gpt_fast.generate(model, prompt, steps, decode=step, prefill=step)


def build(args: PagedArgs, batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
          device: str = "cpu") -> PagedTransformer:
    """A random-weight paged model with its pools (and, for ``table="buffer"``, its table) set up."""
    torch.manual_seed(seed)
    model = PagedTransformer(args).to(device=device, dtype=dtype).eval()
    model.setup_caches(batch, dtype)
    return model


__all__ = ["PagedArgs", "PagedTransformer", "build", "generate", "shuffled_table"]
