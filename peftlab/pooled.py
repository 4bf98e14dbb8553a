"""The last block at the pooled positions only.

A classifier reads one position per row from the body's output: the last real token of a
causal LM, the first of an encoder. Every position below the last block matters (the pooled one
attends to them all), but the last block's own outputs are read only there: its queries,
attention, output projection, MLP and the final norm need B rows, only its keys and values all
N. On SmolLM2-135M that is 94% of the last block's weights, ~3% of a training step's FLOPs; on
MiniLM-L6 (6 blocks, pooled at [CLS]) 10-14% of a LoRA epoch.

    body up to the last block   all N positions (padded or not: `unpad.last_hidden`)
    last block                  keys, values: all N; the rest: the B pooled rows
    final norm                  the B pooled rows

The body runs until the last block is called (a hook takes its input and stops it there); the
block then runs here, through its own submodules, so LoRA, IA3 and adapter hooks on them apply
as usual. Built for Llama's decoder layer (SmolLM2, Llama) and BERT's encoder layer (MiniLM;
post-norm, no final norm); other blocks, FSDP-sharded ones
(their weights are gathered when the block itself is called), hooks on the block's output or
on its attention module (neither is called here), KV caches of rows' own,
attention other than SDPA, a pooled position that does not see its whole row (the first token
of a causal LM), and callers reading every row of the last block (`whole_last_block`) run the
body whole. Keys and values that every row shares (a prefix, a shared soft prompt: `virtual.
shared_cache`) go in front of the block's own.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertAttention, BertLayer, BertSelfAttention
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, rotate_half

from peftlab.arch import hidden_arg
from peftlab.unpad import Layout, causal, input_mask, last_hidden, plain_sdpa, with_shared
from peftlab.virtual import shared_key_values

KeysValues = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

ENABLED = True  # bench.speed_switch turns it off for its A/B runs
_whole = contextvars.ContextVar("peftlab_whole_last_block", default=False)


@contextlib.contextmanager
def whole_last_block() -> Iterator[None]:
    """Inside, the last block and the final norm run on every position: for callers that read
    their inputs there (per-token feature caches)."""
    token = _whole.set(True)
    try:
        yield
    finally:
        _whole.reset(token)


def block_input(module: nn.Module, run: Callable[[], object]) -> tuple[tuple, dict] | None:
    """Call `run()` until `module` is called, and return that call's (args, kwargs) instead of
    running it; None when `run()` finished without calling it."""
    class Entered(Exception):  # a class per call: nested captures each catch their own
        pass
    got = []

    def grab(mod, args, kwargs):
        got.append((args, kwargs))
        raise Entered

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    except Entered:
        return got[0]
    finally:
        handle.remove()
    return None


def hidden_at(model: nn.Module, kw: dict, mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The body's output (B, H) at positions `at` (B,), for `kw` and the full `mask` (B, T) as
    `virtual.body_inputs` builds them: the last block computed at those positions only where
    that holds (`_shortcut`), else `unpad.last_hidden` there."""
    at, mask = at.long(), input_mask(kw, mask).long()
    rows = torch.arange(len(at), device=at.device)
    if not _shortcut(model, kw, mask, rows, at):
        return last_hidden(model, kw, mask)[rows, at]
    block = model.arch.blocks[-1]
    shared = shared_key_values(kw)  # keys and values every row sees first (read before the body adds to them)
    ran: list[torch.Tensor] = []
    entered = block_input(block, lambda: ran.append(last_hidden(model, kw, mask)))
    if entered is None:  # the body's block list stops short of the last block (`features.top_only`)
        return ran[0][rows, at]
    h = hidden_arg(*entered)
    n = shared[-1][0].shape[2] if shared else 0
    if h.shape[:2] == mask.shape:  # padded (B, T, H): keys at every position, pads masked
        key_mask = torch.cat([mask.new_ones(len(mask), n), mask], 1).bool()[:, None, None, :]
        grid, q_at = (lambda t: t), (rows, at)
    else:  # unpadded (1, N, H): keys on attention's grid, as `unpad` lays them out
        lay = Layout(mask)
        key_mask, grid = lay.key_mask(n), lay.grid
        q_at = (0, (mask.reshape(-1).cumsum(0) - 1)[rows * mask.shape[1] + at])

    def keys_values(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return with_shared(shared[-1], grid(k), grid(v)) if shared else (grid(k), grid(v))
    impl = model.arch.body.config._attn_implementation
    out = _block(block, h, entered[1], q_at, key_mask, keys_values, impl)
    return (out if model.arch.final_norm is None else model.arch.final_norm(out))[:, 0]


def _shortcut(model: nn.Module, kw: dict, mask: torch.Tensor, rows: torch.Tensor, at: torch.Tensor) -> bool:
    """Whether the last block may run at `at` only: a block `_block` knows, called by the body as
    it is, with no KV cache but keys every row shares, every pooled position real and seeing its
    whole row."""
    arch = model.arch
    block = arch.blocks[-1]
    kind = BLOCKS.get(type(block))
    if not ENABLED or _whole.get() or kind is None or not kind.fits(block, arch.final_norm) \
            or not plain_sdpa(arch.body, kw) or _hooked(block, kind.skipped(block)):
        return False
    if not bool(mask[rows, at].all()):
        return False  # a pooled position that is padding (an empty row)
    return not causal(model) or torch.equal(at, pool_position(mask, "last"))  # causal: a token sees those before it


def pool_position(mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) the position `how` ("last" or "first") pools."""
    if how == "last":
        return (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # largest position that is real
    if how == "first":
        return mask.argmax(-1)  # smallest position that is real
    raise ValueError(f"unknown pooling '{how}'; valid: last, first, mean")


def _hooked(block: nn.Module, skipped: list[nn.Module]) -> bool:
    """Hooks that would not run here: the block is never called (its pre-hooks run: the body
    calls it), nor are the `skipped` modules (e.g. a parallel adapter reading attention's input)."""
    return bool(block._forward_hooks or block._backward_hooks or block._backward_pre_hooks
                or any(a._forward_pre_hooks or a._forward_hooks or a._backward_hooks or a._backward_pre_hooks
                       for a in skipped))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings on (..., heads, head_dim) with (..., head_dim) cos and sin."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


def _block(block: nn.Module, h: torch.Tensor, kwargs: dict, q_at: tuple, key_mask: torch.Tensor,
           keys_values: KeysValues, impl: str) -> torch.Tensor:
    """The block's forward on `h` with queries at `h[q_at]` only: (B, 1, H) out. `kwargs`: those
    the body called the block with; `keys_values` lays (1|B, heads, T, head_dim) keys and values
    out as attention takes them (behind any that every row shares), `key_mask` the real ones."""
    return BLOCKS[type(block)].run(block, h, kwargs, q_at, key_mask, keys_values, impl)


def _llama(block: nn.Module, h: torch.Tensor, kwargs: dict, q_at: tuple, key_mask: torch.Tensor,
           keys_values: KeysValues, impl: str) -> torch.Tensor:
    """`LlamaDecoderLayer.forward` with queries at `h[q_at]` only (pre-norm)."""
    cos, sin = kwargs["position_embeddings"]
    attn = block.self_attn
    d = attn.head_dim
    x = block.input_layernorm(h)
    k = _rope(attn.k_proj(x).unflatten(-1, (-1, d)), cos, sin).transpose(1, 2)
    v = attn.v_proj(x).unflatten(-1, (-1, d)).transpose(1, 2)
    q = _rope(attn.q_proj(x[q_at][:, None]).unflatten(-1, (-1, d)), cos[q_at][:, None], sin[q_at][:, None])
    out, _ = ALL_ATTENTION_FUNCTIONS[impl](
        attn, q.transpose(1, 2), *keys_values(k, v), key_mask, dropout=attn.attention_dropout if attn.training else 0.0,
        scaling=attn.scaling, is_causal=False)
    h = h[q_at][:, None] + attn.o_proj(out.flatten(-2))
    return h + block.mlp(block.post_attention_layernorm(h))


def _bert(block: nn.Module, h: torch.Tensor, kwargs: dict, q_at: tuple, key_mask: torch.Tensor,
          keys_values: KeysValues, impl: str) -> torch.Tensor:
    """`BertLayer.forward` with queries at `h[q_at]` only (post-norm: each sublayer's LayerNorm
    follows its residual sum, so both are per row)."""
    attn = block.attention.self
    d = attn.attention_head_size
    k = attn.key(h).unflatten(-1, (-1, d)).transpose(1, 2)
    v = attn.value(h).unflatten(-1, (-1, d)).transpose(1, 2)
    hq = h[q_at][:, None]
    q = attn.query(hq).unflatten(-1, (-1, d)).transpose(1, 2)
    out, _ = ALL_ATTENTION_FUNCTIONS[impl](
        attn, q, *keys_values(k, v), key_mask, dropout=attn.dropout.p if attn.training else 0.0, scaling=attn.scaling,
        is_causal=False)
    a = block.attention.output(out.flatten(-2), hq)
    return block.output(block.intermediate(a), a)


class _Kind(NamedTuple):
    """What this module knows of one kind of block."""

    run: Callable[..., torch.Tensor]  # its forward at the pooled rows (`_block`'s arguments)
    fits: Callable[[nn.Module, nn.Module | None], bool]  # (block, final norm): its parts are the ones `run` knows
    skipped: Callable[[nn.Module], list[nn.Module]]  # its modules `run` does not call (their hooks would not run)


# exact types: a subclass may do more in its forward (FSDP's sharded blocks gather their weights there)
BLOCKS: dict[type, _Kind] = {
    LlamaDecoderLayer: _Kind(
        _llama, lambda block, norm: type(block.self_attn) is LlamaAttention and norm is not None,
        lambda block: [block.self_attn]),
    BertLayer: _Kind(
        _bert, lambda block, norm: (type(block.attention) is BertAttention and not block.is_decoder
                                    and type(block.attention.self) is BertSelfAttention and norm is None),
        lambda block: [block.attention, block.attention.self]),
}
