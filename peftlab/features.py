"""Cached features: run the frozen bottom of a network once, train the top from disk.

When nothing below some block trains (head only, last-N blocks, last-block+norm, a frozen
backbone under task heads), every epoch recomputes the same hidden states there. We compute
them once per split, store them under PEFTLAB_HOME/features as safetensors, keyed by a hash of
the frozen weights, the tokenizer, the token ids and the cut point, pooling and attention mode,
so any change of model, data or pooling gives a new key (the old file is never read again).
A bf16 run computes its features under bf16 autocast, as its end-to-end epochs would (1.7x
faster than fp32 on SST-2 here); they are keyed apart from fp32 ones.

The cut point is one of:
  pooled     nothing in the body trains: the pooled (N, H) vectors, the head trains alone
  block b    blocks[b:] (and the final norm) train: the hidden states entering block b,
             stored per real token, and the top runs from them through the model's own code

The frozen bottom runs in eval mode (no dropout), so training from the cache equals training
the same parameters end to end with the frozen part in eval mode.
"""

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab import pooled
from peftlab.arch import hidden_arg
from peftlab.batching import Encoded, collate, eval_batches, pad_rows
from peftlab.checkpoint import load_weights, save_weights
from peftlab.models import peftlab_home
from peftlab.pooled import block_input, whole_last_block
from peftlab.speed import autocast, bf16_weights, fp32_attention, resolve

POOLED = -1  # the cut point "pooled features": nothing in the body trains


def features_dir() -> Path:
    return peftlab_home() / "features"


def cut_point(model: nn.Module) -> int | None:
    """Where the frozen bottom ends: POOLED, a block index b (blocks[b:] train), or None when
    nothing can be cached (trainable embeddings, virtual tokens, label-word scoring, no gain)."""
    arch = model.arch
    if any(getattr(model, part, None) is not None for part in ("prompt", "prefix", "adapters")):
        return None  # they change the body's computation from outside it (and frozen_digest can't see them)
    if not getattr(model, "reads_features", False):  # label words read token positions, not features
        return None
    block_of = {id(p): i for i, b in enumerate(arch.blocks) for p in b.parameters()}
    norm = {id(p) for p in arch.final_norm.parameters()} if arch.final_norm is not None else set()
    trained = [p for p in arch.body.parameters() if p.requires_grad]
    if not trained:
        return POOLED
    if any(id(p) not in block_of and id(p) not in norm for p in trained):
        return None  # embeddings (or another part outside the blocks) train
    first = min((block_of[id(p)] for p in trained if id(p) in block_of), default=len(arch.blocks))
    return first if first > 0 else None  # b = 0 would cache the embeddings only: no gain


def _entry(model: nn.Module, point: int) -> nn.Module:
    """The module whose input is the cached hidden state at block `point`."""
    arch = model.arch
    return arch.blocks[point] if point < len(arch.blocks) else arch.final_norm


@contextmanager
def top_only(model: nn.Module, point: int, hidden: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """Within: the body runs only blocks[point:] (and its final norm), starting from `hidden`
    (B, T, H) with real positions `mask` instead of the embeddings of whatever ids it is given
    (their real tokens alone when the body runs unpadded). Masks and positions are still made by
    the model's own code from the attention mask."""
    arch = model.arch
    parent_path, _, attr = arch.family.blocks.rpartition(".")
    parent = arch.body.get_submodule(parent_path) if parent_path else arch.body
    entry = _entry(model, point)

    def swap(module, args, kwargs):
        given = hidden_arg(args, kwargs)
        h = hidden if given.shape[:2] == hidden.shape[:2] else hidden[mask.bool()][None]  # unpadded
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = entry.register_forward_pre_hook(swap, with_kwargs=True)
    setattr(parent, attr, nn.ModuleList(list(arch.blocks)[point:]))
    try:
        yield
    finally:
        setattr(parent, attr, arch.blocks)
        handle.remove()


@dataclass
class FeatureCache:
    """One split's features at a cut point: pooled (N, H), or per real token (sum T, H) + offsets."""

    point: int
    hidden: torch.Tensor
    offsets: np.ndarray | None  # row i is hidden[offsets[i]:offsets[i+1]] (per-token caches)
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def join(parts: list["FeatureCache"]) -> "FeatureCache":
        """Several caches (e.g. one per task) as one, rows in order."""
        labels = np.concatenate([c.labels for c in parts])
        if parts[0].offsets is None:
            return FeatureCache(parts[0].point, torch.cat([c.hidden for c in parts]), None, labels)
        starts = np.cumsum([0] + [len(c.hidden) for c in parts[:-1]])
        offsets = np.concatenate([[0]] + [c.offsets[1:] + s for c, s in zip(parts, starts)])
        return FeatureCache(parts[0].point, torch.cat([c.hidden for c in parts]), offsets, labels)

    def batch(self, idx: np.ndarray, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx` as a padded (B, T, H) tensor and its (B, T) mask (pooled: (B, H), None)."""
        if self.offsets is None:
            return self.hidden[torch.as_tensor(idx)], None
        return pad_rows([self.hidden[self.offsets[i]:self.offsets[i + 1]] for i in idx], side)


def logits_from_cache(model: nn.Module, cache: FeatureCache, idx: np.ndarray, side: str,
                      **route) -> torch.Tensor:
    """The model's logits for rows `idx`, computed from the cache (route: e.g. task_ids for multi-task)."""
    hidden, mask = cache.batch(idx, side)
    if cache.point == POOLED:
        return model.classify(hidden, **route)
    with top_only(model, cache.point, hidden, mask):
        return model(torch.zeros_like(mask), mask, **route)


def frozen_digest(model: nn.Module, point: int) -> str:
    """A hash of the weights below the cut (all of the body for pooled features): only they
    decide the values there. Hashed once per run and shared by its splits."""
    arch = model.arch
    tensors = [*arch.body.named_parameters(), *arch.body.named_buffers()]
    if point != POOLED:
        top_modules = [*list(arch.blocks)[point:], *([arch.final_norm] if arch.final_norm is not None else [])]
        top = {id(t) for m in top_modules for t in [*m.parameters(), *m.buffers()]}
        tensors = [(n, t) for n, t in tensors if id(t) not in top]
    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def cache_key(model: nn.Module, enc: Encoded, tokenizer, point: int, weights: str | None = None,
              precision: str = "fp32") -> str:
    """A hash of everything the cached values depend on (`weights`: a frozen_digest already taken)."""
    arch = model.arch
    h = hashlib.blake2b(digest_size=16)
    meta = {"point": point, "pooling": getattr(model, "pooling", None), "model_type": arch.model_type,
            "bidirectional": bool(getattr(model, "bidirectional", False)), "side": tokenizer.padding_side,
            "attn": getattr(arch.body.config, "_attn_implementation", None), "tokenizer": type(tokenizer).__name__,
            "weights": weights or frozen_digest(model, point)}
    if resolve(precision) == "bf16":  # only then: fp32 keys stay those of earlier versions
        meta["precision"] = "bf16"
    if point == POOLED and pooled.ENABLED:  # pooled by `pooled.hidden_at` (since 2026-11-25): not earlier files
        meta["last_block"] = "pooled"
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(enc.lengths.tobytes())
    h.update(np.concatenate([np.asarray(x, dtype=np.int64) for x in enc.input_ids]).tobytes())
    return h.hexdigest()


def build_caches(model: nn.Module, data: dict[str, Encoded], tokenizer, point: int, *, batch_size: int = 64,
                 progress: bool = True, precision: str = "fp32") -> dict[str, FeatureCache]:
    """Every split's cache. A multi-task split is cached task by task, so multi- and single-task
    runs on the same data share their files."""
    weights = frozen_digest(model, point)

    def cache(split: str, enc: Encoded) -> FeatureCache:
        if enc.task_ids is None:
            return build_cache(model, enc, tokenizer, point, batch_size=batch_size, weights=weights,
                               desc=f"caching {split} features", progress=progress, precision=precision)
        parts = [enc.select(np.flatnonzero(enc.task_ids == k)) for k in np.unique(enc.task_ids)]
        return FeatureCache.join([cache(f"{split} (task {k})", dataclasses.replace(e, task_ids=None))
                                  for k, e in enumerate(parts)])
    return {split: cache(split, enc) for split, enc in data.items()}


@torch.inference_mode()
def build_cache(model: nn.Module, enc: Encoded, tokenizer, point: int, *, batch_size: int = 64,
                weights: str | None = None, desc: str = "caching features", progress: bool = True,
                precision: str = "fp32") -> FeatureCache:
    """Load the split's features at `point` from disk, or compute and store them (under bf16
    autocast when `precision` resolves to bf16, with the same kernels as bf16 training runs)."""
    path = features_dir() / f"{cache_key(model, enc, tokenizer, point, weights, precision)}.safetensors"
    if path.is_file():
        t = load_weights(path)
        offsets = t["offsets"].numpy() if "offsets" in t else None
        return FeatureCache(point, t["hidden"], offsets, enc.labels)
    was_training = model.training
    model.eval()
    pad, side = tokenizer.pad_token_id, tokenizer.padding_side
    rows: list[torch.Tensor | None] = [None] * len(enc)
    try:
        batches = eval_batches(enc.lengths, batch_size)
        bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=None if progress else True)
        with autocast(precision), bf16_weights([model], precision, frozen_only=False), \
                fp32_attention([model]):
            for idx in bar:
                b = collate(enc, idx, pad, side)
                if point == POOLED:
                    feats = model.features(b["input_ids"], b["attention_mask"])
                    for j, i in enumerate(idx):
                        rows[i] = feats[j].to(torch.float32, copy=True)
                    continue
                with whole_last_block():  # the cut may be the final norm's input: every position
                    h = hidden_arg(*block_input(_entry(model, point),
                                                lambda: model.features(b["input_ids"], b["attention_mask"])))
                mask = b["attention_mask"].bool()
                per_row = h.split(mask.sum(1).tolist(), 1) if h.shape[:2] != mask.shape else None  # unpadded
                for j, i in enumerate(idx):
                    row = h[j][mask[j]] if per_row is None else per_row[j][0]
                    rows[i] = row.to(torch.float32, copy=True)
    finally:
        model.train(was_training)
    if point == POOLED:
        cache = FeatureCache(point, torch.stack(rows), None, enc.labels)
        save_weights(path, {"hidden": cache.hidden})
    else:
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        cache = FeatureCache(point, torch.cat(rows), offsets, enc.labels)
        save_weights(path, {"hidden": cache.hidden, "offsets": torch.from_numpy(offsets)})
    return cache
