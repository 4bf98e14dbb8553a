"""The one training loop every method shares, and the evaluation helpers it uses.

Methods differ only in which parameters have requires_grad; this loop trains whatever does:
AdamW, warmup then linear/cosine decay, gradient accumulation, clipping, evaluation each epoch,
best epoch by the validation metric.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from peftlab.batching import Encoded, batch_indices, collate
from peftlab.errors import PeftlabError
from peftlab.features import FeatureCache, logits_from_cache
from peftlab.metrics import classification_metrics


@dataclass
class TrainArgs:
    """Hyperparameters of the training loop (each is also a CLI flag)."""

    epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step (before accumulation)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the method's own)"})
    head_lr: float = field(default=1e-2, metadata={"help": "peak learning rate of the freshly initialised task head"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decay on matrices (not biases/norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps with linear warmup"})
    schedule: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"help": "decay after warmup"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size for evaluation"})
    bucket: bool = field(default=True, metadata={"help": "batch examples of similar length together"})

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.head_lr > 0, f"--head-lr must be positive, got {self.head_lr}"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 turns clipping off)"),
            (self.schedule in ("linear", "cosine", "constant"), "--schedule must be linear, cosine or constant"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PeftlabError(msg)


@dataclass
class Epoch:
    epoch: int
    train_loss: float
    val_loss: float
    val: dict[str, float]
    seconds: float
    tokens: int


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)
    return f


def make_optimizer(model: nn.Module, lr: float, head_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the task head in its own group: a fresh head needs a far larger step than
    pretrained weights (at the body's 5e-5 it barely moves in a few hundred steps)."""
    head = {id(p) for p in model.head.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    heads = [p for p in model.head.parameters() if p.requires_grad]
    # decay matrices only: biases and norm gains are not regularised (as in GPT-2 / nanoGPT)
    groups = [{"params": [p for p in body if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
              {"params": [p for p in body if p.dim() < 2], "weight_decay": 0.0, "lr": lr},
              {"params": heads, "weight_decay": weight_decay, "lr": head_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


Logits = Callable[[np.ndarray], torch.Tensor]  # example indices -> their (B, num_labels) logits


def logits_fn(model: nn.Module, enc: Encoded, pad_id: int, side: str, cache: FeatureCache | None = None) -> Logits:
    """How to get logits for some rows of a split: from tokens, or from cached features; rows of a
    multi-task split are routed to their task's head."""
    def logits(idx: np.ndarray) -> torch.Tensor:
        route = {"task_ids": torch.as_tensor(enc.task_ids[idx])} if enc.task_ids is not None else {}
        if cache is not None:
            return logits_from_cache(model, cache, idx, side, **route)
        b = collate(enc, idx, pad_id, side)
        return model(b["input_ids"], b["attention_mask"], **route)
    return logits


@torch.inference_mode()
def predict(model: nn.Module, enc: Encoded, logits: Logits, batch_size: int, bucket: bool = True
            ) -> tuple[np.ndarray, float]:
    """Logits for every example in the original order, and the mean cross-entropy."""
    was_training = model.training
    model.eval()
    out_all = None
    loss_sum = 0.0
    for idx in batch_indices(enc.lengths, batch_size, shuffle=False, bucket=bucket):
        out = logits(idx).float()
        loss_sum += F.cross_entropy(out, torch.as_tensor(enc.labels[idx]), reduction="sum").item()
        if out_all is None:
            out_all = np.zeros((len(enc), out.shape[-1]), dtype=np.float32)
        out_all[idx] = out.numpy()
    model.train(was_training)
    return out_all, loss_sum / max(1, len(enc))


def evaluate(model: nn.Module, enc: Encoded, batch_size: int, pad_id: int, side: str,
             cache: FeatureCache | None = None) -> tuple[dict, float]:
    """Metrics (accuracy, macro-F1, MCC) and mean loss on one split."""
    logits, loss = predict(model, enc, logits_fn(model, enc, pad_id, side, cache), batch_size)
    return classification_metrics(logits.argmax(-1), enc.labels), loss


def train(model: nn.Module, lengths: np.ndarray, batch_loss: Callable[[np.ndarray], tuple[torch.Tensor, int]],
          validate: Callable[[], tuple[dict, float]], args: TrainArgs, *, lr: float, seed: int, metric: str,
          on_best: Callable[[Epoch], None] = lambda e: None, progress: bool = True,
          plan: Callable[[int], list[np.ndarray]] | None = None,
          on_step: Callable[[int, float, float], None] = lambda step, loss, lr: None,
          on_epoch: Callable[[Epoch], None] = lambda e: None, also: tuple[str, ...] = ()) -> list[Epoch]:
    """Train the parameters that require grad; call `on_best` after each epoch that improves `metric`.

    The task enters through two functions: `batch_loss(indices)` gives the loss of those training
    examples and their token count, `validate()` the validation metrics and loss. `plan(epoch)`
    gives an epoch's batches (default: shuffled, length-bucketed batches of all examples).
    `on_step(step, loss, lr)` and `on_epoch(epoch)` see every optimizer step and epoch (logging);
    `also` names more validation metrics for the epoch line (a multi-task run's 'cola/mcc', ...).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftlabError("nothing to train: the method selected no parameters")
    opt = make_optimizer(model, lr, args.head_lr, args.weight_decay)
    plan = plan or (lambda epoch: batch_indices(lengths, args.batch_size, shuffle=True, seed=seed + epoch,
                                                bucket=args.bucket))
    first = plan(0)
    n_batches = len(first)
    steps_per_epoch = math.ceil(n_batches / args.grad_accum)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.schedule, int(args.warmup_ratio * total), total))
    history: list[Epoch] = []
    best = -math.inf
    model.train()
    for epoch in range(args.epochs):
        batches = first if epoch == 0 else plan(epoch)
        t0, tokens, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=None if progress else True,
                   unit="batch", dynamic_ncols=True)
        for i, idx in enumerate(bar):
            loss, n_tokens = batch_loss(idx)
            if not torch.isfinite(loss):
                raise PeftlabError(f"the loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}; "
                                   "lower --lr (or --head-lr) or keep --max-grad-norm on")
            (loss / args.grad_accum).backward()
            if (i + 1) % args.grad_accum == 0 or i + 1 == len(batches):
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
                on_step(sched.last_epoch, loss.item(), sched.get_last_lr()[0])
                sched.step()
                opt.zero_grad(set_to_none=True)
            loss_sum += loss.item()
            tokens += n_tokens
            bar.set_postfix(loss=f"{loss_sum / (i + 1):.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        seconds = time.perf_counter() - t0
        val, val_loss = validate()
        ep = Epoch(epoch + 1, loss_sum / len(batches), val_loss, val, seconds, tokens)
        history.append(ep)
        on_epoch(ep)
        if progress:
            parts = "".join(f"  {k} {val[k]:.4f}" for k in also if k in val)
            tqdm.write(f"epoch {ep.epoch}: train loss {ep.train_loss:.4f}  val loss {val_loss:.4f}  "
                       f"val {metric} {val[metric]:.4f}{parts}  ({seconds:.1f}s, {tokens / seconds:.0f} tok/s)")
        if val[metric] > best:
            best = val[metric]
            on_best(ep)
    return history


class TensorBoard:
    """Training curves for TensorBoard: loss and learning rate per step, metrics per epoch."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise PeftlabError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def hooks(self) -> dict:
        return {"on_step": self.step, "on_epoch": self.epoch}

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, ep) -> None:
        self.writer.add_scalar("epoch/train_loss", ep.train_loss, ep.epoch)
        self.writer.add_scalar("epoch/val_loss", ep.val_loss, ep.epoch)
        for k, v in ep.val.items():
            self.writer.add_scalar(f"val/{k}", v, ep.epoch)

    def close(self) -> None:
        self.writer.close()
