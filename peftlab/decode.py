"""peftlab's own decoding loop: greedy or sampled, batched with left padding, KV cache.

    next_logits  one forward step -> (B, V) logits of the last position, and the cache
    pick         logits -> next token ids (repetition penalty, temperature, top-k, top-p)
    generate     the loop: stop on EOS / stop ids / stop strings, max_new_tokens, seeded sampling,
                 an optional callback per step (streaming)

Works with every method: virtual tokens (soft prompts, prefixes) go into the first step and
stay in the cache; positions and masks come from `virtual.body_inputs`.
"""

import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from peftlab import parallel
from peftlab.errors import PeftlabError
from peftlab.methods.lora import inference_weights
from peftlab.runconfig import Sampling
from peftlab.speed import autocast, resolve
from peftlab.virtual import body_inputs, output_cache, virtual_tokens


def next_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, past=None, use_cache: bool = True,
                kv_dtype: torch.dtype | None = None):
    """(B, V) logits for the next token, the cache (or None) and the full mask used; a new
    cache keeps its keys and values in `kv_dtype` if given."""
    kw, full_mask, _ = body_inputs(model, ids, mask, past=past, use_cache=use_cache, kv_dtype=kv_dtype,
                                   share_start=1)  # a first step's common start (an instruction) runs once
    out = model.arch.body(**kw)
    logits = model.arch.lm_head(out.last_hidden_state[:, -1])
    return logits.float(), (output_cache(out) if use_cache else None), full_mask


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def pick(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits, (B, T) tokens so far -> (B,) next tokens."""
    if s.repetition_penalty != 1.0:
        prev = logits.gather(-1, seen)
        logits = logits.scatter(-1, seen, torch.where(prev > 0, prev / s.repetition_penalty,
                                                     prev * s.repetition_penalty))
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / s.temperature, s.top_k, s.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@parallel.inference
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             sampling: Sampling | None = None, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
             use_cache: bool = True, seed: int | None = None, stop_strings: tuple[str, ...] = (),
             tokenizer=None, on_step: Callable[[torch.Tensor], None] | None = None,
             precision: str = "fp32") -> torch.Tensor:
    """Left-padded (B, T) prompts -> (B, <= max_new_tokens) new tokens, pad after a row stops.

    A row stops at the first token in `stop_ids` (kept in the output), or once its decoded text
    holds one of `stop_strings` (needs `tokenizer`; cut the text with `trim_at_stop`); all rows
    stop when every row has. `on_step(tokens)` sees each step's (B,) tokens, for streaming.
    `use_cache=False` recomputes every step from scratch (the reference). `precision` 'bf16' (or
    'auto' where the CPU has bf16 instructions) decodes under bf16 autocast with the weights cast
    once (prepacked for oneDNN), not once per token, and the KV cache held in bf16; a single active LoRA adapter runs
    merged into the weights (`lora.inference_weights`).
    """
    room = _room(model, attention_mask)
    if room < max_new_tokens:
        warnings.warn(f"{model.arch.model_type}'s learned positions run out before {max_new_tokens} new tokens "
                      "after some prompts: their outputs stop there (shorter prompts leave more room)")
        max_new_tokens = room
    kv_dtype = torch.bfloat16 if resolve(precision) == "bf16" else None  # what attention reads under autocast
    with inference_weights(model, precision, model.arch.lm_head, pack=True), autocast(precision):
        return _generate(model, input_ids, attention_mask, max_new_tokens, sampling, stop_ids, pad_id, use_cache,
                         seed, stop_strings, tokenizer, on_step, kv_dtype)


def _room(model: nn.Module, attention_mask: torch.Tensor) -> int:
    """New tokens that fit the model's positions after the longest prompt (virtual tokens count):
    unbounded for rotary models, the rest of the table for learned ones (GPT-2 would index past it)."""
    arch = model.arch
    if not arch.family.learned_positions:
        return sys.maxsize
    virtual = sum(virtual_tokens(model))
    context = arch.body.config.max_position_embeddings
    used = max(parallel.gather_objects(int(attention_mask.sum(1).max()) + virtual))  # one length for all processes
    if used >= context:
        raise PeftlabError(f"a prompt takes {used} of {arch.model_type}'s {context} positions, leaving none to "
                           f"generate into; shorten it (--max-length {context - virtual - 1} or less)")
    return context - used


def _generate(model, input_ids, attention_mask, max_new_tokens, sampling, stop_ids, pad_id, use_cache, seed,
              stop_strings, tokenizer, on_step, kv_dtype) -> torch.Tensor:
    if any(not s for s in stop_strings):
        raise PeftlabError("a stop string (--stop) is empty, which would stop at once; give non-empty text")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to read the generated text")
    s = sampling or Sampling()
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    B = input_ids.shape[0]
    seq, mask = input_ids, attention_mask
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    past, full_mask, step_ids = None, None, input_ids
    for t in range(max_new_tokens):
        if use_cache:
            logits, past, full_mask = next_logits(model, step_ids, mask if past is None else full_mask, past,
                                                  kv_dtype=kv_dtype)
        else:
            logits, _, _ = next_logits(model, seq, mask, use_cache=False)
        token = pick(logits, seq, s, gen)
        out[:, t] = torch.where(done, torch.full_like(token, pad_id), token)
        if on_step is not None:
            on_step(out[:, t])
        done |= torch.isin(token, stops)
        if stop_strings:
            done |= _hit_stop_string(out[:, :t + 1], done, tokenizer, stop_strings)
        if parallel.all_done(bool(done.all())):  # under torchrun: when every process's rows are
            return out[:, :t + 1]
        step_ids = token[:, None]
        seq = torch.cat([seq, step_ids], 1)
        new = mask.new_ones(B, 1)  # finished rows run on; their outputs are discarded
        mask = torch.cat([mask, new], 1)
        if use_cache:
            full_mask = torch.cat([full_mask, new], 1)
    return out


def _hit_stop_string(new: torch.Tensor, done: torch.Tensor, tokenizer, stop_strings: tuple[str, ...]) -> torch.Tensor:
    """Rows (not yet done) whose generated text so far, leading whitespace aside, holds a stop string."""
    hit = torch.zeros_like(done)
    for i in (~done).nonzero().flatten().tolist():
        text = tokenizer.decode(new[i], skip_special_tokens=True).lstrip()
        hit[i] = any(s in text for s in stop_strings)
    return hit


def trim_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    """The text before the first stop string (a generated newline ends a one-line answer);
    leading whitespace does not count, so an answer may start on a new line."""
    text = text.lstrip()
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]
