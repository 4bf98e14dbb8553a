"""No work on padding: the body runs on a batch's real tokens only.

A padded batch of B rows x T tokens costs B*T tokens in every projection and MLP, whatever
the padding. Here the real tokens are laid end to end as one row of N (the positions each
would have alone), so every per-token layer does N tokens' work; attention alone, which must
keep the rows apart, scatters its queries, keys and values back into a (B, T) grid, right-
padded so that a causal model needs no mask at all, and gathers the outputs again.

    input       [pad pad a1 a2 a3] [b1 b2 pad pad pad]      B x T, left or right padded
    body        [a1 a2 a3 b1 b2]                            1 x N, positions 0 1 2 0 1
    attention   [a1 a2 a3] [b1 b2 0]                        B x max length, per row
    output      [0 0 a1 a2 a3] [b1 b2 0 0 0]                back in the input's layout

Only the attention layer knows the grid (`_attention`, registered with transformers as an
attention implementation for the duration of one body call); the outputs equal the padded
forward's at the real positions, up to float rounding. Keys and values every row shares (a
prefix, a soft prompt or common start run once: `virtual.shared_cache`) go in front of each
row's on the grid, with a mask that lets every query see them.
"""

import contextvars
import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from peftlab.speed import FP32_SDPA
from peftlab.virtual import by_index, cache_arg, shared_key_values

_UNPADDED = "peftlab_unpadded"
ATTENTIONS = ("sdpa", FP32_SDPA)  # the implementations that run on the grid (others: padded as given)

# A batch is run unpadded from this much padding (a share of its real tokens) up: the scatters and
# gathers cost ~3% of a short SmolLM2-135M training step, which runs faster unpadded from ~10% of
# padding on (1.25x from 20%; paired steps of real SST-2 batches, docs/benchmarks.md).
MIN_PADDING = 0.10


@dataclass
class _Grid:
    layout: "Layout"
    key_mask: torch.Tensor | None  # the keys each query sees (`Layout.key_mask`); None: causal, no shared keys
    inner: str  # the attention implementation that runs on the grid
    shared: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer, keys and values every row sees first


_grid: contextvars.ContextVar[_Grid] = contextvars.ContextVar("peftlab_unpad_grid")


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """(1, heads, N, head_dim) queries, keys, values -> (1, N, heads, head_dim), each row attending
    within itself (after the keys every row shares, if any): the grid's attention (the
    implementation the model had) on the scattered rows."""
    g = _grid.get()
    lay = g.layout
    key, value = lay.grid(key), lay.grid(value)
    if g.shared is not None:
        key, value = with_shared(g.shared[module.layer_idx], key, value)
    out, _ = ALL_ATTENTION_FUNCTIONS[g.inner](
        module, lay.grid(query), key, value, g.key_mask, dropout=dropout, scaling=scaling,
        is_causal=is_causal if g.key_mask is None else False, **kwargs)
    return out.reshape(-1, *out.shape[2:]).index_select(0, lay.index)[None], None


def with_shared(shared: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, kv_heads, T, head_dim) keys and values with the (1, kv_heads, n, head_dim) ones every
    row shares in front, as a KV cache would concatenate them (dtypes promoted as it does)."""
    (k, v), B = shared, key.shape[0]
    return torch.cat([k.expand(B, -1, -1, -1), key], 2), torch.cat([v.expand(B, -1, -1, -1), value], 2)


@functools.cache
def _register() -> None:
    # no mask function registered under this name: transformers then builds no mask at all
    AttentionInterface.register(_UNPADDED, _attention)


def last_hidden(model: nn.Module, kw: dict, mask: torch.Tensor) -> torch.Tensor:
    """`model.arch.body(**kw).last_hidden_state` (B, T, H) for `kw` and the full `mask` as
    `virtual.body_inputs` builds them, with no work on padding where the model allows it (no KV
    cache wanted, none given but keys every row shares, e.g. a prefix; attention transformers'
    SDPA): a batch with enough padding runs on its real tokens only, pad positions then coming
    back as zeros. (Running the other batches right-aligned without a mask, which a causal model
    allows, measured no faster than with one.)"""
    body = model.arch.body
    mask = input_mask(kw, mask)
    real = int(mask.sum())
    pads = mask.numel() - real
    if not pads or pads < MIN_PADDING * real or by_index() or not plain_sdpa(body, kw):
        return body(**kw).last_hidden_state
    return _unpadded(body, kw, Layout(mask), causal=causal(model))


def input_mask(kw: dict, mask: torch.Tensor) -> torch.Tensor:
    """The columns of a full mask (cached keys first) that are the body's own input tokens in `kw`."""
    return mask[:, -kw.get("inputs_embeds", kw.get("input_ids")).shape[1]:]


def plain_sdpa(body: nn.Module, kw: dict) -> bool:
    """True when `body(**kw)` writes no KV cache, reads none but keys every row shares
    (`virtual.shared_cache`: a prefix, a shared soft prompt), and its attention is SDPA: the
    call whose attention may be run elsewhere (on a grid, at some queries only)."""
    return not kw.get("use_cache") and (cache_arg(type(body)) not in kw or shared_key_values(kw) is not None) \
        and body.config._attn_implementation in ATTENTIONS


def causal(model: nn.Module) -> bool:
    """Whether each token of `model`'s body sees only those before it (a causal LM not run bidirectionally)."""
    return model.arch.causal and not getattr(model, "bidirectional", False)


class Layout:
    """Where a padded batch's real tokens go: laid end to end (`flat`: their places in the
    flattened batch, row-major, so each row's stay in order), and on attention's right-padded
    grid of the longest row's width (`index`)."""

    def __init__(self, mask: torch.Tensor):
        real = mask.bool()
        self.shape = real.shape
        self.flat = real.reshape(-1).nonzero().squeeze(1)
        self.lengths = real.sum(1)
        self.width = int(self.lengths.max())
        rank = real.cumsum(1) - 1  # a token's place among its row's real tokens = its position
        self.positions = rank[real]
        self.index = (torch.arange(real.shape[0], device=mask.device)[:, None] * self.width + rank)[real]

    def real(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the real tokens, end to end."""
        return t.reshape(-1, *t.shape[2:])[self.flat]

    def grid(self, t: torch.Tensor) -> torch.Tensor:
        """(1, heads, N, head_dim) -> (B, heads, width, head_dim), each row's tokens at the start of
        its row (zeros after), in the (B, T, heads, head_dim) memory layout of transformers'."""
        h, d = t.shape[1], t.shape[3]
        B, T = self.shape[0], self.width
        grid = t.new_zeros(B * T, h, d).index_copy(0, self.index, t[0].transpose(0, 1))
        return grid.view(B, T, h, d).transpose(1, 2)

    def key_mask(self, shared: int = 0) -> torch.Tensor:
        """(B, 1, 1, shared + width): the keys every row shares, then the grid's real ones."""
        real = torch.arange(self.width, device=self.lengths.device) < self.lengths[:, None]
        return torch.cat([real.new_ones(real.shape[0], shared), real], 1)[:, None, None, :]

    def causal_mask(self, shared: int) -> torch.Tensor:
        """(1, 1, width, shared + width): each grid position sees the shared keys and its row's
        keys up to itself (a pad key only ever sits after every real query of its row)."""
        return torch.ones(self.width, shared + self.width, dtype=torch.bool, device=self.lengths.device
                          ).tril(shared)[None, None]

    def back(self, t: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...) in the input's layout, zeros at the pads."""
        return t.new_zeros(self.shape.numel(), *t.shape[1:]).index_copy(0, self.flat, t).view(*self.shape, *t.shape[1:])


def _unpadded(body: nn.Module, kw: dict, lay: Layout, causal: bool) -> torch.Tensor:
    """The body on the real tokens end to end, attention on the grid (`_attention`); `causal`:
    each token sees those before it, else every real token of its row; both after the keys
    every row shares (a KV cache in `kw` from `virtual.shared_cache`)."""
    cache = cache_arg(type(body))
    inputs = {k: v for k, v in kw.items()
              if k not in ("attention_mask", "position_ids", "input_ids", "inputs_embeds", cache)}
    name = "inputs_embeds" if "inputs_embeds" in kw else "input_ids"
    shared = shared_key_values(kw)
    n = shared[0][0].shape[2] if shared else 0
    inputs[name] = lay.real(kw[name])[None]
    # positions as the padded call has them: given (causal LMs, after any cached keys), else counted
    # in each row after the cached keys (BERT numbers new tokens from the cache's length on)
    inputs["position_ids"] = (lay.real(kw["position_ids"]) if "position_ids" in kw else lay.positions + n)[None]
    key_mask = lay.key_mask(n) if not causal else lay.causal_mask(n) if shared else None
    cfg, inner = body.config, body.config._attn_implementation
    _register()
    token = _grid.set(_Grid(lay, key_mask, inner, shared))
    cfg._attn_implementation = _UNPADDED
    try:
        hidden = body(**inputs).last_hidden_state[0]
    finally:
        cfg._attn_implementation = inner
        _grid.reset(token)
    return lay.back(hidden)
