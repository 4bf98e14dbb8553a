"""The one training loop every method shares, and the evaluation helpers it uses.

Methods differ only in which parameters have requires_grad; this loop trains whatever does:
AdamW, warmup then linear/cosine decay, gradient accumulation, clipping, evaluation each epoch,
best epoch by the validation metric.
"""

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from peftlab import parallel
from peftlab.batching import Encoded, batch_indices, collate, eval_batches
from peftlab.errors import PeftlabError
from peftlab.features import FeatureCache, logits_from_cache
from peftlab.methods.lora import inference_weights
from peftlab.measure import fmt_seconds
from peftlab.metrics import classification_metrics, percent
from peftlab.runconfig import TrainArgs
from peftlab.speed import autocast, bf16_weights, fp32_attention, tune_allocator


@dataclass
class Epoch:
    epoch: int
    train_loss: float
    val_loss: float
    val: dict[str, float]
    seconds: float
    tokens: int
    losses: list[float] = field(default_factory=list)  # each optimizer step's training loss


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
    groups = [{"params": [p for p in params if (p.dim() >= 2) == matrix], "lr": group_lr,
               "weight_decay": weight_decay if matrix else 0.0}
              for params, group_lr in ((body, lr), (heads, head_lr)) for matrix in (True, False)]
    # one fused kernel over all tensors (HF Trainer's default too): the per-tensor loop that
    # torch picks on the CPU takes 3-5x longer, 0.2-0.35 s a step when all 135M weights train
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


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


@parallel.inference
def predict(model: nn.Module, enc: Encoded, logits: Logits, batch_size: int, bucket: bool = True,
            precision: str = "fp32") -> tuple[np.ndarray, float]:
    """Logits for every example in the original order, and the mean cross-entropy. Under bf16
    every projection reads a bf16 copy of its weight, not a cast per batch: made once for the call
    (after a single LoRA adapter is merged), or, for frozen weights while `train()` runs (which
    merges nothing), once for the run."""
    was_training = model.training
    model.eval()
    out_all = None
    loss_sum = 0.0
    batches, real = parallel.my_batches(eval_batches(enc.lengths, batch_size, bucket))
    with inference_weights(model, precision):
        for j, idx in enumerate(batches):  # under torchrun each process takes its share of the batches
            with autocast(precision):
                out = logits(idx).float()
            if out_all is None:
                out_all = np.zeros((len(enc), out.shape[-1]), dtype=np.float32)
            if j < real:
                loss_sum += F.cross_entropy(out, torch.as_tensor(enc.labels[idx]), reduction="sum").item()
                out_all[idx] = out.numpy()
    model.train(was_training)
    [loss_sum] = parallel.all_sum(loss_sum)
    return parallel.sum_arrays(out_all), loss_sum / max(1, len(enc))


def evaluate(model: nn.Module, enc: Encoded, batch_size: int, pad_id: int, side: str,
             cache: FeatureCache | None = None, precision: str = "fp32",
             score: Callable[[torch.Tensor], dict] | None = None) -> tuple[dict, float, np.ndarray]:
    """Metrics (accuracy, macro-F1, MCC; or `score(logits)`), mean loss and the logits of one split."""
    logits, loss = predict(model, enc, logits_fn(model, enc, pad_id, side, cache), batch_size, precision=precision)
    return (score(logits) if score else classification_metrics(logits.argmax(-1), enc.labels)), loss, logits


@dataclass
class Position:
    """Where training stands between two optimizer steps: with the weights, the optimizer and the
    RNG, enough to continue exactly (a checkpoint holds all of it)."""

    epoch: int = 0  # the epoch under way (0-based)
    batch: int = 0  # its next batch
    loss_sum: float = 0.0  # over the epoch's batches so far
    seen: int = 0  # batches that count in loss_sum
    tokens: int = 0
    seconds: float = 0.0  # spent in the epoch so far
    best: float = -math.inf
    best_epoch: int = 0
    skipped: int = 0  # batches skipped for a non-finite loss or gradient
    resumes: int = 0
    elapsed: float = 0.0  # seconds in this loop so far, over every process that ran it (resumes)
    losses: list[float] = field(default_factory=list)  # the epoch's step losses so far
    history: list[Epoch] = field(default_factory=list)


Checkpoint = tuple[dict[str, torch.Tensor], dict]  # tensors, and the JSON-able rest


def training_state(model: nn.Module, opt: torch.optim.Optimizer, sched, pos: Position,
                   rng: torch.Tensor) -> Checkpoint:
    """The trainable weights, optimizer moments, RNG and position as tensors + JSON."""
    tensors = {f"param.{n}": parallel.full(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
    sd = opt.state_dict()
    scalars = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = parallel.full(v)  # whole tensors: resumable by any number of processes
            else:
                scalars[f"{i}.{k}"] = v
    tensors["rng.torch"] = parallel.gather_rng(rng)
    return tensors, {"position": dataclasses.asdict(pos), "param_groups": sd["param_groups"],
                     "opt_scalars": scalars, "scheduler": sched.state_dict()}


def restore_state(model: nn.Module, opt: torch.optim.Optimizer, sched, ckpt: Checkpoint) -> Position:
    tensors, state = ckpt
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != set(params):
        raise PeftlabError(f"the checkpoint trains {len(saved)} tensors, this run {len(params)}: it belongs to "
                           "another model or method; start the run again without --resume")
    if [len(g["params"]) for g in state["param_groups"]] != [len(g["params"]) for g in opt.param_groups]:
        raise PeftlabError("the checkpoint's optimizer groups its tensors otherwise (an earlier peftlab wrote it); "
                           "start the run again without --resume")
    parallel.load_state(model, {n: tensors[f"param.{n}"] for n in params})
    order = [p for g in opt.param_groups for p in g["params"]]  # the optimizer's own numbering
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = parallel.like(v, order[int(i)])
    for k, v in state["opt_scalars"].items():
        i, name = k.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched.load_state_dict(state["scheduler"])
    parallel.set_rng(tensors["rng.torch"])
    pos = Position(**{**state["position"], "history": [Epoch(**e) for e in state["position"]["history"]]})
    if "elapsed" not in state["position"]:  # written before checkpoints kept it: the epochs' time at least
        pos.elapsed = sum(e.seconds for e in pos.history) + pos.seconds
    pos.resumes += 1
    return pos


def _grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return parallel.full(norm)  # under FSDP a replicated DTensor


def _progress_line(pos: Position, n_batches: int, epochs: int, spent: float) -> None:
    """Where an epoch stands, as one line: what a log file gets in place of the progress bar."""
    eta = spent / pos.batch * (n_batches - pos.batch)
    tqdm.write(f"epoch {pos.epoch + 1}/{epochs}: batch {pos.batch}/{n_batches}  train loss "
               f"{pos.loss_sum / max(1, pos.seen):.4f}  {pos.tokens / spent:.0f} tok/s  epoch ETA "
               + (f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.1f} min"))


def train(model: nn.Module, lengths: np.ndarray, batch_loss: Callable[[np.ndarray], tuple[torch.Tensor, int]],
          validate: Callable[[], tuple[dict, float]], args: TrainArgs, *, lr: float, seed: int, metric: str,
          on_best: Callable[[Epoch], None] = lambda e: None, progress: bool = True,
          plan: Callable[[int], list[np.ndarray]] | None = None,
          on_step: Callable[[int, float, float], None] = lambda step, loss, lr: None,
          on_epoch: Callable[[Epoch], None] = lambda e: None, also: tuple[str, ...] = (),
          save: Callable[[Checkpoint], None] | None = None, resume: Checkpoint | None = None,
          weight: Callable[[np.ndarray], float] = len) -> Position:
    """Train the parameters that require grad; call `on_best` after each epoch that improves `metric`.

    The task enters through two functions: `batch_loss(indices)` gives the loss of those training
    examples and their token count, `validate()` the validation metrics and loss. `plan(epoch)`
    gives an epoch's batches (default: shuffled, length-bucketed batches of all examples; a plan
    must be a function of the epoch alone, so that a resumed run sees the same batches).
    `on_step(step, loss, lr)` and `on_epoch(epoch)` see every optimizer step and epoch (logging);
    `also` names more validation metrics for the epoch line (a multi-task run's 'cola/mcc', ...).
    `save(checkpoint)` is called every `args.save_every` steps, when an epoch's batches are done
    and before stopping on a non-finite loss; `resume` continues from such a checkpoint.
    Under torchrun every process runs this loop on its share of each batch; `weight(indices)`
    says how much those rows count in the batch's mean loss (rows, or target tokens).
    Returns the final position (its `history` holds one Epoch per epoch).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftlabError("nothing to train: the method selected no parameters")
    tune_allocator()
    opt = make_optimizer(model, lr, args.head_lr, args.weight_decay)
    plan = plan or (lambda epoch: batch_indices(lengths, args.batch_size, shuffle=True, seed=seed + epoch,
                                                bucket=args.bucket))
    first = plan(0)
    steps_per_epoch = math.ceil(len(first) / args.grad_accum)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.schedule, int(args.warmup_ratio * total), total))
    pos = restore_state(model, opt, sched, resume) if resume is not None else Position()
    started = time.perf_counter() - pos.elapsed

    def checkpoint(rng: torch.Tensor) -> None:
        if save:
            pos.elapsed = time.perf_counter() - started
            save(training_state(model, opt, sched, pos, rng))

    model.train()
    progress = progress and parallel.is_main()
    world = parallel.world()
    # frozen weights cast to bf16 once, not every step; attention in fp32 (its bf16 backward is slow)
    with bf16_weights([model], args.precision), fp32_attention([model]):
        while pos.epoch < args.epochs:
            batches = first if pos.epoch == 0 else plan(pos.epoch)
            t0 = time.perf_counter() - pos.seconds
            bar = tqdm(total=len(batches), initial=pos.batch, desc=f"epoch {pos.epoch + 1}/{args.epochs}", leave=False,
                       disable=None if progress else True, unit="batch", dynamic_ncols=True)
            lines = progress and bar.disable and len(batches) >= 20  # no bar (output to a file): plain lines
            for g0 in range(pos.batch, len(batches), args.grad_accum):
                group = range(g0, min(g0 + args.grad_accum, len(batches)))
                rng = torch.get_rng_state()  # a checkpoint taken now must replay this group's dropout
                loss_sum, tokens, bad = 0.0, 0, None
                for i in group:
                    rows, scale = parallel.share(batches[i], weight)
                    with autocast(args.precision):  # the forward pass; backward follows the same dtypes
                        loss, n_tokens = batch_loss(rows)
                    # the batch's loss and tokens over all processes: each decides alike what to do
                    value, n_tokens = parallel.all_sum(loss.item() * scale / world, n_tokens if scale else 0)
                    if not math.isfinite(value):
                        bad = f"the loss became {value}"
                        break
                    (loss * scale / len(group)).backward()  # a short last group weighs as a full one
                    loss_sum, tokens = loss_sum + value, tokens + int(n_tokens)
                if bad is None:
                    norm = _grad_norm(params, args.max_grad_norm)
                    if not torch.isfinite(norm):
                        bad = f"the gradient norm became {norm.item()}"
                step = sched.last_epoch
                if bad is not None:
                    opt.zero_grad(set_to_none=True)
                    span = f"batch {g0 + 1}" if len(group) == 1 else f"batches {g0 + 1}-{group.stop}"
                    where = f"at step {step + 1} (epoch {pos.epoch + 1}, {span})"
                    if not args.skip_nonfinite:
                        pos.seconds = time.perf_counter() - t0
                        checkpoint(rng)
                        saved = ("; the state before that step is saved: `peftlab train --resume RUN_DIR "
                                 "--skip-nonfinite true` continues from it, skipping such batches") if save else ""
                        raise PeftlabError(f"{bad} {where}{saved}; or start again with a lower --lr (or --head-lr), "
                                           "--max-grad-norm on, or --skip-nonfinite true")
                    pos.skipped += len(group)
                    if parallel.is_main():
                        tqdm.write(f"warning: {bad} {where}; skipped those batches ({pos.skipped} so far)")
                else:
                    opt.step()
                    on_step(step, loss_sum / len(group), sched.get_last_lr()[0])
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    pos.loss_sum += loss_sum
                    pos.seen += len(group)
                    pos.tokens += tokens
                    pos.losses.append(loss_sum / len(group))
                pos.batch = group.stop
                bar.update(len(group))
                bar.set_postfix(loss=f"{pos.loss_sum / max(1, pos.seen):.4f}",
                                tok_s=f"{pos.tokens / (time.perf_counter() - t0):.0f}")
                if lines and 10 * pos.batch // len(batches) > 10 * g0 // len(batches) and pos.batch < len(batches):
                    _progress_line(pos, len(batches), args.epochs, time.perf_counter() - t0)  # every tenth
                if pos.batch == len(batches) or (args.save_every and sched.last_epoch % args.save_every == 0):
                    pos.seconds = time.perf_counter() - t0
                    checkpoint(torch.get_rng_state())
            bar.close()
            seconds = time.perf_counter() - t0
            val, val_loss = validate()
            ep = Epoch(pos.epoch + 1, pos.loss_sum / max(1, pos.seen), val_loss, val, seconds, pos.tokens, pos.losses)
            pos.history.append(ep)
            on_epoch(ep)
            if progress:
                parts = "  ".join(f"{k} {percent(k, val[k]):.1f}" for k in (metric, *also) if k in val)
                tqdm.write(f"epoch {ep.epoch}: train loss {ep.train_loss:.4f}  val loss {val_loss:.4f}  val {parts}  "
                           f"({fmt_seconds(seconds)}s, {pos.tokens / max(seconds, 1e-9):.0f} tok/s)")
            if val[metric] > pos.best:
                pos.best, pos.best_epoch = val[metric], ep.epoch
                on_best(ep)
            pos.epoch, pos.batch, pos.loss_sum, pos.seen, pos.tokens, pos.seconds = pos.epoch + 1, 0, 0.0, 0, 0, 0.0
            pos.losses = []
    pos.elapsed = time.perf_counter() - started
    return pos


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
