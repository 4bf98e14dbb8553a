"""Tokenized examples and the batches made of them: length bucketing and dynamic padding.

Padding costs compute that does nothing, so batches are built from examples of similar length
(sorted within shuffled "mega-batches" for training, fully sorted for evaluation) and padded
only to their own longest row.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from peftlab.errors import PeftlabError

# Training batches are sorted by length within windows of batches: wide windows waste less on
# padding (2000 SST-2 rows in batches of 16: +30% tokens with windows of 8 batches, +6% with 50,
# HF's group_by_length), but a window must not span most of the training set: every epoch would
# get the same length-sorted batches, label-skewed where length predicts the label (spam is
# long); with a fixed 50 small sms_spam and multi-task runs fell below their test bars. So the
# window grows with the data: a quarter of the batches, between 8 and 50.
BUCKET_WINDOW = 8, 50


def bucket_window(n_batches: int) -> int:
    """Batches per length-sorting window for a training set of `n_batches` batches."""
    low, high = BUCKET_WINDOW
    return max(low, min(high, n_batches // 4))


@dataclass
class Encoded:
    """One split, tokenized: token ids per example (unpadded) and label ids."""

    input_ids: list[list[int]]
    labels: np.ndarray
    truncated: int = 0
    task_ids: np.ndarray | None = None  # multi-task splits: each row's task index

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def select(self, rows: np.ndarray) -> "Encoded":
        """These rows only (e.g. one task's rows of a multi-task split)."""
        task_ids = None if self.task_ids is None else self.task_ids[rows]
        return Encoded([self.input_ids[i] for i in rows], self.labels[rows], task_ids=task_ids)


def encode(texts: list[str], labels, tokenizer: PreTrainedTokenizerBase, max_length: int,
           split: str = "data", template: str = "{text}") -> Encoded:
    """Tokenize without padding, each text framed by `template` (which holds `{text}`).

    Texts over max_length are cut on the tokenizer's truncation side; with a template the text
    is shortened instead, so the frame (e.g. a trailing "Sentiment:") is always kept whole.
    """
    check_template(template)
    texts = list(texts)
    ids = tokenizer([fill(template, t) for t in texts], add_special_tokens=True, truncation=False)["input_ids"]
    # an empty text still needs one position to pool from
    filler = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id]
    ids = [x or filler for x in ids]
    long = [i for i, x in enumerate(ids) if len(x) > max_length]
    if long:
        warnings.warn(f"{len(long)} of {len(ids)} {split} texts are longer than {max_length} tokens and were "
                      f"truncated; raise --max-length to keep them whole")
        keep_end = tokenizer.truncation_side == "left"
        for i in long:
            if template == "{text}":  # the tokenizer's own cut keeps special tokens ([CLS] ... [SEP])
                ids[i] = tokenizer(texts[i], truncation=True, max_length=max_length)["input_ids"]
            else:
                ids[i] = fit_template(template, texts[i], tokenizer, max_length, keep_end)
    return Encoded(ids, np.asarray(labels, dtype=np.int64), truncated=len(long))


def check_template(template: str) -> None:
    if template.count("{text}") != 1:
        raise PeftlabError(f"template {template!r} must contain '{{text}}' exactly once, e.g. 'Review: {{text}}\\nSentiment:'")


def fill(template: str, text: str) -> str:
    return template.replace("{text}", text)  # not str.format: texts and templates may hold braces


def fit_template(template: str, text: str, tokenizer, max_length: int, keep_end: bool,
                 special: bool = True) -> list[int]:
    """The longest cut of `text` (in characters; its end when keep_end) whose framed form fits
    in max_length tokens."""
    def encode_cut(n: int) -> list[int]:
        cut = text[len(text) - n:] if keep_end else text[:n]
        return tokenizer(fill(template, cut), add_special_tokens=special)["input_ids"]

    lo, hi = 0, len(text)
    while lo < hi:  # binary search: a few tokenizer calls for each over-long text
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(encode_cut(mid)) <= max_length else (lo, mid - 1)
    ids = encode_cut(lo)
    if len(ids) > max_length:
        raise PeftlabError(f"the template alone takes {len(ids)} tokens, more than --max-length {max_length}; "
                           "shorten the template or raise --max-length")
    return ids


def batch_indices(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                  bucket: bool = True) -> list[np.ndarray]:
    """Split example indices into batches.

    shuffle=True (training): a seeded permutation, sorted by length inside windows of
    `bucket_window` batches when bucketing, then the batches shuffled. shuffle=False (decoding):
    sorted by length when bucketing, else in order. Callers map outputs back through the indices.
    """
    n = len(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable") if bucket else np.arange(n)
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if bucket:
        w = batch_size * bucket_window(-(-n // batch_size))
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in np.split(order, range(w, n, w))])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))] if bucket else batches


def eval_batches(lengths: np.ndarray, batch_size: int, bucket: bool = True) -> list[np.ndarray]:
    """Batches for one forward pass over a split (evaluation, feature caching), longest first:
    each holds at most `batch_size` rows and `batch_size` x the mean length in padded tokens, so
    the few long rows of a long-tailed split come in smaller batches instead of padding up to 63
    others to their length (SMS spam at 64 a batch: 2.3x its real tokens as plain sorted
    batches, 1.3x so). bucket=False: `batch_size` rows each, in order."""
    if not bucket:
        return batch_indices(lengths, batch_size, shuffle=False, bucket=False)
    n, order = len(lengths), np.argsort(-lengths, kind="stable")
    budget = batch_size * max(1.0, float(np.mean(lengths))) if n else 0.0
    batches, start = [], 0
    while start < n:  # a batch's first row is its longest: it sets the padded width
        rows = int(min(batch_size, max(1, budget // max(1, lengths[order[start]]))))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def pad_rows(rows: list[torch.Tensor], side: str, value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack rows of different lengths (token ids, or (T, H) hidden states), padded with `value`
    to the longest on `side` ("left" or "right"); and the (B, T) 0/1 mask of the real positions."""
    width = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        s = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        out[j, s], mask[j, s] = r, 1
    return out, mask


def collate(enc: Encoded, idx: np.ndarray, pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to their longest row on `side` ("left" or "right")."""
    ids, mask = pad_rows([torch.as_tensor(enc.input_ids[i], dtype=torch.long) for i in idx], side, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(enc.labels[idx])}
