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

import torch
from torch import nn
from transformers import DynamicCache


def body_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past=None) -> tuple[dict, torch.Tensor]:
    """Arguments for `model.arch.body` and the mask of the real-token outputs to pool over.

    `model` carries `arch` and optional `prompt` / `prefix` modules (None when absent).
    `past` is a cache of earlier decoding steps; when given, no virtual tokens are added again.
    """
    arch, prompt, prefix = model.arch, getattr(model, "prompt", None), getattr(model, "prefix", None)
    kw: dict = {"use_cache": past is not None}
    mask = attention_mask
    if past is None and (prompt is not None or prefix is not None):
        B = input_ids.shape[0]
        n_prompt = prompt.n if prompt is not None else 0
        n_prefix = prefix.n if prefix is not None else 0
        ones = attention_mask.new_ones(B, n_prefix + n_prompt)
        mask = torch.cat([ones, attention_mask], 1)
        if prompt is not None:
            kw["inputs_embeds"] = torch.cat([prompt(B), arch.embeddings(input_ids)], 1)
        if prefix is not None:
            kw["past_key_values"] = prefix.cache(B, model.arch.body.config)
        pool_mask = torch.cat([attention_mask.new_zeros(B, n_prompt), attention_mask], 1)
    else:
        pool_mask = attention_mask
        if past is not None:
            kw["past_key_values"] = past
    if "inputs_embeds" not in kw:
        kw["input_ids"] = input_ids
    kw["attention_mask"] = mask
    if arch.causal:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kw["position_ids"] = positions[:, -pool_mask.shape[1]:]
    return kw, pool_mask


def prefill(cache_kv: list[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    """A cache holding the given (B, kv_heads, n, head_dim) keys and values for each layer."""
    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(cache_kv):
        cache.update(k, v, i)
    return cache
