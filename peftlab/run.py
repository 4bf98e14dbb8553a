"""One run: load a backbone and a task, apply a method, train, evaluate, write a run directory.

A run directory holds:
  config.json            the resolved RunConfig
  metrics.json           test and best validation metrics, parameter counts, time, memory, history
  trainable.safetensors  the trained parameters (method's and head's) of the best epoch
"""

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from peftlab.batching import Encoded, encode
from peftlab.checkpoint import load_json, load_weights, save_json, save_weights
from peftlab.data import Task, load_task, subset
from peftlab.errors import PeftlabError
from peftlab.heads import POOLINGS, Classifier
from peftlab.measure import PeakMemory, machine, versions
from peftlab.methods import MethodArgs, parse_method, set_trainable, trainable_names
from peftlab.models import Backbone, load_backbone
from peftlab.train import TrainArgs, evaluate, train

CONFIG, METRICS, WEIGHTS = "config.json", "metrics.json", "trainable.safetensors"


@dataclass
class RunConfig:
    """Everything that defines a run (each field is also a CLI flag)."""

    model: str = field(default="smollm2-135m", metadata={"help": "embedded name, GGUF file, model dir or hub id"})
    task: str = field(default="sms_spam", metadata={"help": "built-in task, data file or data folder"})
    method: str = field(default="last-block+norm", metadata={"help": "adaptation method, e.g. head, last-2, full"})
    text_column: str | None = field(default=None, metadata={"help": "text column of a local data file"})
    label_column: str | None = field(default=None, metadata={"help": "label column of a local data file"})
    train_limit: int | None = field(default=None, metadata={"help": "train on a seeded, stratified subset of N rows"})
    eval_limit: int | None = field(default=None, metadata={"help": "validate and test on N rows each"})
    max_length: int = field(default=256, metadata={"help": "truncate texts to this many tokens"})
    pooling: str = field(default="auto", metadata={"help": "auto, last, first or mean"})
    seed: int = field(default=0, metadata={"help": "seeds data order, subsets and head init"})
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<model>-<task>-<method>-<time>)"})
    train: TrainArgs = field(default_factory=TrainArgs)
    method_args: MethodArgs = field(default_factory=MethodArgs)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainArgs(**self.train)
        if isinstance(self.method_args, dict):
            self.method_args = MethodArgs(**self.method_args)
        if self.pooling not in POOLINGS:
            raise PeftlabError(f"--pooling '{self.pooling}' is unknown; valid: {', '.join(POOLINGS)}")
        if self.max_length < 2:
            raise PeftlabError(f"--max-length must be at least 2, got {self.max_length}")
        for name in ("train_limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise PeftlabError(f"--{name.replace('_', '-')} must be at least 1, got {v}")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Prepared:
    """A run's model and data, built but not trained."""

    backbone: Backbone
    model: Classifier
    task: Task
    data: dict[str, Encoded]
    trainable: list[str]
    lr: float


def prepare(cfg: RunConfig, backbone: Backbone | None = None) -> Prepared:
    """Load (or reuse) the backbone, load and tokenize the task, apply the method, freeze the rest."""
    method = parse_method(cfg.method, cfg.method_args)  # fail fast, before any loading
    task = load_task(cfg.task, text_column=cfg.text_column, label_column=cfg.label_column, seed=cfg.seed)
    backbone = backbone or load_backbone(cfg.model, seed=cfg.seed)
    tok = backbone.tokenizer
    limits = {"train": cfg.train_limit, "validation": cfg.eval_limit, "test": cfg.eval_limit}
    data = {}
    for split, ds in task.splits.items():
        ds = subset(ds, limits[split], cfg.seed)
        data[split] = encode(ds["text"], ds["label"], tok, cfg.max_length, split)
    torch.manual_seed(cfg.seed)
    model = Classifier(backbone.arch, task.num_labels, cfg.pooling, tok)
    method.apply(model)
    names = trainable_names(model, method)
    set_trainable(model, names)
    return Prepared(backbone, model, task, data, names, cfg.train.lr or method.default_lr)


def count_params(model: torch.nn.Module, names: list[str]) -> tuple[int, int]:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names), sum(p.numel() for p in params.values())


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{Path(cfg.model).stem}-{Path(cfg.task).stem}-{cfg.method}-{stamp}".replace("+", "_")
    return Path("runs") / name


def train_run(cfg: RunConfig, *, backbone: Backbone | None = None, progress: bool = True) -> dict:
    """Train and evaluate one run; write its directory. Returns the metrics record."""
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    _check_writable(out)
    t_start = time.perf_counter()
    with PeakMemory() as mem:
        p = prepare(cfg, backbone)
        pad, side = p.backbone.tokenizer.pad_token_id, p.backbone.tokenizer.padding_side
        save_json(out / CONFIG, dataclasses.asdict(cfg))
        best: dict = {}
        trained = set(p.trainable)

        def on_best(ep) -> None:
            state = {n: t.detach().clone() for n, t in p.model.named_parameters() if n in trained}
            best.update(epoch=ep.epoch, state=state)
            save_weights(out / WEIGHTS, state)

        t_train = time.perf_counter()
        history = train(p.model, p.data["train"], p.data["validation"], cfg.train, lr=p.lr, seed=cfg.seed,
                        pad_id=pad, side=side, metric=p.task.metric, on_best=on_best, progress=progress)
        train_seconds = time.perf_counter() - t_train
        p.model.load_state_dict(best["state"], strict=False)
        test, test_loss = evaluate(p.model, p.data["test"], cfg.train.eval_batch_size, pad, side)
    n_train, n_total = count_params(p.model, p.trainable)
    best_ep = history[best["epoch"] - 1]
    record = {
        "model": cfg.model, "task": p.task.name, "method": cfg.method, "metric": p.task.metric,
        "test": test, "test_loss": test_loss, "validation": best_ep.val, "best_epoch": best["epoch"],
        "trainable_params": n_train, "total_params": n_total, "trainable_pct": 100 * n_train / n_total,
        "lr": p.lr, "train_rows": len(p.data["train"]), "test_rows": len(p.data["test"]),
        "truncated_texts": {s: e.truncated for s, e in p.data.items()},
        "wall_time_s": time.perf_counter() - t_start, "train_time_s": train_seconds,
        "time_per_epoch_s": [e.seconds for e in history],
        "tokens_per_s": sum(e.tokens for e in history) / max(1e-9, sum(e.seconds for e in history)),
        "peak_memory_mb": mem.peak_mb,
        "history": [dataclasses.asdict(e) for e in history],
        "run_dir": str(out), "versions": versions(), "machine": machine(),
    }
    save_json(out / METRICS, record)
    return record


def load_run(run_dir: str | Path, backbone: Backbone | None = None) -> tuple[RunConfig, Prepared]:
    """Rebuild a finished run's model with its trained weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PeftlabError(f"run directory '{run_dir}' does not exist")
    cfg = RunConfig.from_dict(load_json(run_dir / CONFIG))
    p = prepare(cfg, backbone)
    weights = load_weights(run_dir / WEIGHTS)
    missing = sorted(set(p.trainable) - set(weights))
    if missing:
        raise PeftlabError(f"'{run_dir / WEIGHTS}' lacks {len(missing)} trained tensors (e.g. {missing[0]}); "
                           "it does not belong to this run's model and method")
    p.model.load_state_dict(weights, strict=False)
    return cfg, p


def eval_run(run_dir: str | Path, split: str = "test") -> dict[str, float]:
    """Metrics of a saved run on one split."""
    if split not in ("train", "validation", "test"):
        raise PeftlabError(f"--split '{split}' is unknown; valid: train, validation, test")
    cfg, p = load_run(run_dir)
    tok = p.backbone.tokenizer
    metrics, loss = evaluate(p.model, p.data[split], cfg.train.eval_batch_size, tok.pad_token_id, tok.padding_side)
    return {**metrics, "loss": loss, "rows": len(p.data[split])}


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PeftlabError(f"cannot write to run directory '{out}' ({e.strerror}); choose another with --out") from e
    if (out / METRICS).exists():
        raise PeftlabError(f"'{out}' already holds a finished run; choose a new --out or delete it")


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


