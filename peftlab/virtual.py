"""Virtual tokens: learned positions placed in front of the real ones.

Two places in the unified view take them: a soft prompt (prompt tuning) adds n vectors to the
input embeddings, a prefix (prefix tuning) adds n keys and values to every attention layer.
`body_inputs` turns token ids plus whatever virtual tokens a model carries into the arguments
of the transformer body, with masks and positions right under left or right padding:

    sequence    [prefix (keys/values only)] [soft prompt] [pad ... tokens] (causal, left-padded)
    attention   prefix and prompt visible to every real token; pads masked
    positions   count real positions only, prefix and prompt included, so a padded row sees
                the positions it would alone
"""

import functools
import inspect

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def body_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past=None, use_cache: bool = False, kv_dtype: torch.dtype | None = None
                ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Arguments for `model.arch.body`, the full attention mask, and the mask to pool over.

    `model` carries `arch` and optional `prompt` / `prefix` modules (None when absent).
    Without `past`, virtual tokens are added and `attention_mask` covers the real tokens only.
    With `past` (a cache from earlier decoding steps, virtual tokens already inside),
    `attention_mask` is the running mask over everything cached plus the new tokens.
    The returned full mask is what the next decoding step extends. `kv_dtype` (with `use_cache`,
    no `past`): the new cache keeps keys and values in that dtype (`prefill`).
    """
    arch, prompt, prefix = model.arch, getattr(model, "prompt", None), getattr(model, "prefix", None)
    cache = cache_arg(type(arch.body))
    kw: dict = {"use_cache": use_cache}
    mask, pool_mask, n_new = attention_mask, attention_mask, input_ids.shape[1]
    if past is not None:
        kw[cache] = past
    elif prompt is not None or prefix is not None:
        B = input_ids.shape[0]
        n_prefix, n_prompt = virtual_tokens(model)
        mask = torch.cat([attention_mask.new_ones(B, n_prefix + n_prompt), attention_mask], 1)
        pool_mask = torch.cat([attention_mask.new_zeros(B, n_prompt), attention_mask], 1)
        n_new += n_prompt
        if prompt is not None:
            kw["inputs_embeds"] = torch.cat([prompt(B), arch.embeddings(input_ids)], 1)
        if prefix is not None:
            kw[cache] = prefix.cache(B, arch.body.config, kv_dtype)
    if use_cache and kv_dtype is not None and cache not in kw:
        kw[cache] = prefill([], arch.body.config, kv_dtype)
    if "inputs_embeds" not in kw:
        kw["input_ids"] = input_ids
    kw["attention_mask"] = mask
    if getattr(model, "bidirectional", False):
        kw["attention_mask"] = full_attention_mask(mask, n_new, arch.body.config, arch.embeddings.weight.dtype)
    if arch.causal:
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -n_new:]
    return kw, mask, pool_mask[:, -n_new:]


def virtual_tokens(model: nn.Module) -> tuple[int, int]:
    """(prefix, soft prompt) virtual tokens the model carries; both take positions."""
    return tuple(getattr(getattr(model, part, None), "n", 0) for part in ("prefix", "prompt"))


@functools.cache
def cache_arg(body_type: type) -> str:
    """The body's keyword for a KV cache: transformers 5.24 renamed past_key_values to cache (the
    old name warns, and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(body_type.forward).parameters else "past_key_values"


def output_cache(out) -> DynamicCache | None:
    """The KV cache a body's forward returned (`cache` from transformers 5.24, `past_key_values` before)."""
    return out.get("cache", out.get("past_key_values"))


def full_attention_mask(mask: torch.Tensor, n_query: int, config, dtype: torch.dtype) -> torch.Tensor:
    """A 4D mask that lets every query see every real key (no causal mask): a causal LM run
    bidirectionally. Transformers passes a 4D mask through as given."""
    allowed = mask[:, None, None, :].bool().expand(-1, 1, n_query, -1)
    if config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class _StoredAs(DynamicLayer):
    """A cache layer that keeps keys and values in one dtype, for decoding under autocast.

    Under bf16 autocast Llama's keys leave the rotary embedding in fp32, so transformers' cache
    grows them in fp32 (5.23 the values too) and autocast casts all of it to bf16 again at every
    step's attention: at batch 8 that is up to 10% of a decoding step. Stored rounded to bf16
    once, attention reads the values the casts would have made (decoded tokens are the same),
    from half the memory. (`update` casts before the layer's lazy initialization sees them.)"""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.stored = dtype

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(key_states.to(self.stored), value_states.to(self.stored), *args, **kwargs)


def prefill(cache_kv: list[tuple[torch.Tensor, torch.Tensor]], config, dtype: torch.dtype | None = None
            ) -> DynamicCache:
    """A cache holding the given (B, kv_heads, n, head_dim) keys and values for each layer; with
    `dtype`, every layer keeps what it holds and gains in that dtype (bf16 under bf16 autocast)."""
    cache = DynamicCache(config=config)
    if dtype is not None:
        cache.layers = [_StoredAs(dtype) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for i, (k, v) in enumerate(cache_kv):
        cache.update(k, v, i)
    return cache
