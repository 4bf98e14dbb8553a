"""Virtual tokens: learned positions placed in front of the real ones.

Two places in the unified view take them: a soft prompt (prompt tuning) adds n vectors to the
input embeddings, a prefix (prefix tuning) adds n keys and values to every attention layer.
`body_inputs` turns token ids plus whatever virtual tokens a model carries into the arguments
of the transformer body, with masks and positions right under left or right padding:

    sequence    [prefix (keys/values only)] [soft prompt] [pad ... tokens] (causal, left-padded)
    attention   prefix and prompt visible to every real token; pads masked
    positions   count real positions only, prefix and prompt included, so a padded row sees
                the positions it would alone

Both are the same in every row. A prefix goes to the body as a KV cache of keys and values
every row shares (`shared_cache`); so does a soft prompt under causal attention, which never
sees the row's text: the prompt runs through the body once per batch instead of once per row
(`start_cache`), and so do tokens that start every row alike, for callers that
read only each row's end (`common_start`: k-shot examples before label words, an instruction
before decoding). Code that lays rows out its own way (`unpad`, `pooled`) reads those keys
back once (`shared_key_values`).
"""

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


_by_index = contextvars.ContextVar("peftlab_rows_by_index", default=False)


@contextlib.contextmanager
def rows_by_index() -> Iterator[None]:
    """Inside, layers route rows by their index in the batch (`lora.per_row`: per-task LoRA
    adapters, mixed batches): each row runs as it is, padded (`unpad`), with its own prompt."""
    token = _by_index.set(True)
    try:
        yield
    finally:
        _by_index.reset(token)


def by_index() -> bool:
    """Whether rows are routed by their index in the batch here (`rows_by_index`)."""
    return _by_index.get()


def body_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past=None, use_cache: bool = False, kv_dtype: torch.dtype | None = None, share_start: int = 0
                ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Arguments for `model.arch.body`, the full attention mask, and the mask to pool over.

    `model` carries `arch` and optional `prompt` / `prefix` modules (None when absent).
    Without `past`, virtual tokens are added and `attention_mask` covers the real tokens only.
    With `past` (a cache from earlier decoding steps, virtual tokens already inside),
    `attention_mask` is the running mask over everything cached plus the new tokens.
    The returned full mask is what the next decoding step extends. `kv_dtype` (with `use_cache`,
    no `past`): the new cache keeps keys and values in that dtype (`prefill`).

    `share_start` k >= 1, for callers that read the body's output at each row's last k positions
    only (label words, decoding): the tokens every row starts with alike (k-shot examples, an
    instruction) run once for the batch, in the shared KV cache (`common_start`), and the body's
    input and output, `input_ids` and the pool mask cover the rest of each row.
    """
    arch, prompt, prefix = model.arch, getattr(model, "prompt", None), getattr(model, "prefix", None)
    cache = cache_arg(type(arch.body))
    kw: dict = {"use_cache": use_cache}
    mask, pool_mask, n_new = attention_mask, attention_mask, input_ids.shape[1]
    if past is not None:
        kw[cache] = past
    elif prompt is not None or prefix is not None or share_start:
        B = input_ids.shape[0]
        shared = shares_rows(model, B)
        split = common_start(input_ids, attention_mask, share_start) if share_start and shared else None
        lead = None
        if split is not None:  # the rest of each row becomes the body's input
            lead, input_ids, attention_mask = split
            pool_mask, n_new = attention_mask, input_ids.shape[1]
        n_prefix, n_prompt = virtual_tokens(model)
        n_lead = 0 if lead is None else lead.shape[1]
        mask = torch.cat([attention_mask.new_ones(B, n_prefix + n_prompt + n_lead), attention_mask], 1)
        if shared and (prompt is not None or lead is not None):
            kw[cache] = start_cache(model, B, kv_dtype, lead)
        elif prompt is not None or prefix is not None:
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


def shares_rows(model: nn.Module, batch_size: int) -> bool:
    """Whether what every row starts with alike (a soft prompt, common tokens) may be computed
    once for the whole batch: under causal attention the same vectors at the same positions never
    see the rest of their row, so their hidden states are the same in every row. Not where they
    differ: per-task prompts in a batch of several tasks, a body that attends both ways, dropout
    drawing its own mask in each row, rows routed by their index in the batch (`rows_by_index`:
    per-task LoRA adapters)."""
    prompt = getattr(model, "prompt", None)
    if batch_size < 2 or not getattr(prompt, "same_in_every_row", prompt is None) or not model.arch.causal \
            or getattr(model, "bidirectional", False) or by_index():
        return False
    body = model.arch.body
    return not body.training or not (getattr(body.config, "attention_dropout", 0.0) or any(
        isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in model.modules()))


# Common starting tokens run once when that saves at least this share of a batch's real tokens
# (below it, the extra call of the body on one row costs about what it saves).
MIN_SHARED = 0.25


def common_start(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The tokens every row's text starts with alike, (1, p), and the rows without them (B, T - p)
    ids and mask, each row's other tokens shifted p places towards its start; None when sharing
    them saves less than MIN_SHARED of the real tokens. Each row keeps its last `keep` tokens
    (the positions its caller reads). Padding may sit on either side, or both, of each row's
    tokens; positions count real tokens only (`body_inputs`), so the rest keep theirs."""
    lengths = attention_mask.sum(1)
    first = attention_mask.argmax(1)  # where each row's tokens start
    width = int(lengths.min()) - keep
    if width < 1 or not bool((attention_mask.cumsum(1).gather(1, (first + lengths - 1)[:, None]).squeeze(1)
                              == lengths).all()):  # some row's tokens are not in one piece
        return None
    head = input_ids.gather(1, first[:, None] + torch.arange(width, device=input_ids.device))
    p = int((head == head[:1]).all(0).long().cumprod(0).sum())
    if p == 0 or p * (len(input_ids) - 1) < MIN_SHARED * int(lengths.sum()):
        return None
    j = torch.arange(input_ids.shape[1] - p, device=input_ids.device)[None]
    rest = torch.where(j < first[:, None], j, j + p)  # pads before a row's tokens stay; its tokens move up p
    return head[:1, :p], input_ids.gather(1, rest), attention_mask.gather(1, rest)


def start_cache(model: nn.Module, batch_size: int, kv_dtype: torch.dtype | None = None,
                 tokens: torch.Tensor | None = None) -> DynamicCache:
    """The soft prompt (after the prefix, if any), then `tokens` (1, p) every row starts with, run
    through the body once, their keys and values in every layer shared by the batch's rows: a KV
    cache in front of the rest, as a prefix's.

    On SmolLM2-135M with 20 virtual tokens before 128 text tokens the rows' prompt positions were
    12% of a training step's tokens, every row computing the same ones (docs/benchmarks.md)."""
    arch, prefix, prompt = model.arch, getattr(model, "prefix", None), getattr(model, "prompt", None)
    config = arch.body.config
    n_prefix, n = virtual_tokens(model)
    kw: dict = {"use_cache": True}
    if prompt is None:
        kw["input_ids"] = tokens
    else:
        kw["inputs_embeds"] = torch.cat([prompt(1), *([] if tokens is None else [arch.embeddings(tokens)])], 1)
    n += 0 if tokens is None else tokens.shape[1]
    device = arch.embeddings.weight.device
    kw["attention_mask"] = torch.ones(1, n_prefix + n, dtype=torch.long, device=device)
    kw[cache_arg(type(arch.body))] = prefix.cache(1, config) if prefix is not None else prefill([], config)
    if arch.causal:
        kw["position_ids"] = torch.arange(n_prefix, n_prefix + n, device=device)[None]
    once = output_cache(arch.body(**kw))
    return shared_cache([(layer.keys, layer.values) for layer in once.layers], batch_size, config, kv_dtype)


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
    return out["cache"] if "cache" in out else out.get("past_key_values")  # the old name warns when read


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


def shared_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, config,
                 dtype: torch.dtype | None = None) -> DynamicCache:
    """A cache whose rows all hold the same keys and values, (1, kv_heads, n, head_dim) per layer
    in `kv` (a prefix, a shared soft prompt). `shared_key_values` hands them back once, for code
    that lays the rows out its own way (`unpad`, `pooled`)."""
    cache = prefill([(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in kv],
                    config, dtype)
    cache.peftlab_shared = kv
    return cache


def shared_key_values(kw: dict) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer, the keys and values every row of the cache in `kw` (body arguments) holds,
    (1, kv_heads, n, head_dim), as `shared_cache` made it; None when there is no cache, or when
    it holds rows of their own (a body call added its tokens: decoding)."""
    cache = kw.get("cache", kw.get("past_key_values"))
    kv = getattr(cache, "peftlab_shared", None)
    return kv if kv and cache.get_seq_length() == kv[0][0].shape[2] else None


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
