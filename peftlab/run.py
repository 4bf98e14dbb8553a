"""One run: load a backbone and a task, apply a method, train, evaluate, write a run directory.

A run directory holds:
  config.json            the resolved RunConfig
  metrics.json           test and best validation metrics, parameter counts, time, memory, history
  trainable.safetensors  the trained parameters (method's and head's) of the best epoch
"""

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TextIO
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from peftlab.batching import Encoded, collate, encode
from peftlab.checkpoint import atomic_write_text, load_json, load_weights, save_json, save_weights
from peftlab.data import Task, load_task, subset
from peftlab.errors import PeftlabError
from peftlab.decode import Sampling, generate, trim_at_stop
from peftlab.generation import GenTask, Pairs, collate_pairs, complete, encode_pairs, evaluate_generation, \
    is_generation, lm_loss, load_gen_task
from peftlab.heads import POOLINGS, Classifier, LanguageModel
from peftlab.measure import PeakMemory, machine, versions
from peftlab.methods import MethodArgs, parse_method, set_trainable, trainable_names
from peftlab.models import Backbone, load_backbone
from peftlab.train import TrainArgs, classification_loss, evaluate, train

CONFIG, METRICS, WEIGHTS = "config.json", "metrics.json", "trainable.safetensors"
PREDICTIONS = "predictions.jsonl"  # generation runs: each test prompt's output and reference


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
    head: Literal["linear", "label-words"] = field(
        default="linear", metadata={"help": "a new linear head, or label-word scoring through the LM head"})
    label_words: str | None = field(default=None, metadata={"help": "comma-separated words, one per label "
                                                             "(default: the task's)"})
    template: str | None = field(default=None, metadata={"help": "frame each text, e.g. 'Review: {text}\\nSentiment:' "
                                                         "(default: the task's with label words, else the bare text)"})
    input_column: str | None = field(default=None, metadata={"help": "input column of a local generation data file"})
    target_column: str | None = field(default=None, metadata={"help": "target column of a local generation data "
                                                              "file (makes the task generative)"})
    sep_token: str | None = field(default=None, metadata={"help": "generation: a new separator token between input "
                                                          "and target, its embedding trained (e.g. '<|sep|>')"})
    chat: bool = field(default=False, metadata={"help": "generation: wrap prompts in the model's chat template"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "generation: tokens to decode at most "
                                                               "(default: the task's)"})
    seed: int = field(default=0, metadata={"help": "seeds data order, subsets and head init"})
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<model>-<task>-<method>-<time>)"})
    train: TrainArgs = field(default_factory=TrainArgs)
    method_args: MethodArgs = field(default_factory=MethodArgs)
    decoding: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainArgs(**self.train)
        if isinstance(self.method_args, dict):
            self.method_args = MethodArgs(**self.method_args)
        if isinstance(self.decoding, dict):
            self.decoding = Sampling(**self.decoding)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise PeftlabError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.template:
            self.template = self.template.replace("\\n", "\n")  # '\n' typed in a shell means a newline
        if self.head not in ("linear", "label-words"):
            raise PeftlabError(f"--head '{self.head}' is unknown; valid: linear, label-words")
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
    model: Classifier | LanguageModel
    task: Task | GenTask
    data: dict[str, Encoded] | dict[str, Pairs]
    trainable: list[str]
    lr: float

    @property
    def generative(self) -> bool:
        return isinstance(self.task, GenTask)


def prepare(cfg: RunConfig, backbone: Backbone | None = None) -> Prepared:
    """Load (or reuse) the backbone, load and tokenize the task, apply the method, freeze the rest."""
    method = parse_method(cfg.method, cfg.method_args)  # fail fast, before any loading
    generative = is_generation(cfg.task, cfg.target_column)
    if generative:
        task = load_gen_task(cfg.task, input_column=cfg.input_column, target_column=cfg.target_column, seed=cfg.seed)
    else:
        task = load_task(cfg.task, text_column=cfg.text_column, label_column=cfg.label_column, seed=cfg.seed)
    backbone = backbone or load_backbone(cfg.model, seed=cfg.seed)
    tok = backbone.tokenizer
    limits = {"train": cfg.train_limit, "validation": cfg.eval_limit, "test": cfg.eval_limit}
    torch.manual_seed(cfg.seed)
    if generative:
        model = LanguageModel(backbone.arch, tok, cfg.sep_token)
        sep = (model.head.id,) if cfg.sep_token else ()
        data = {split: encode_pairs(ds["text"], ds["target"], tok, cfg.template or task.template, cfg.max_length,
                                    keep_end=task.keep_end, sep_ids=sep, chat=cfg.chat)
                for split, ds in ((s, subset(d, limits[s], cfg.seed)) for s, d in task.splits.items())}
    else:
        words = None
        if cfg.head == "label-words":
            words = tuple(w.strip() for w in cfg.label_words.split(",")) if cfg.label_words else task.words
        template = cfg.template or (task.template if words else "{text}")
        data = {}
        for split, ds in task.splits.items():
            ds = subset(ds, limits[split], cfg.seed)
            data[split] = encode(ds["text"], ds["label"], tok, cfg.max_length, split, template)
        torch.manual_seed(cfg.seed)
        model = Classifier(backbone.arch, task.num_labels, cfg.pooling, tok, words)
    method.apply(model)
    names = trainable_names(model, method)
    if not names:
        raise PeftlabError(f"method '{cfg.method}' with --head {cfg.head} trains nothing; pick a method "
                           "that adds parameters (e.g. prompt, lora) or use --head linear")
    set_trainable(model, names)
    return Prepared(backbone, model, task, data, names, cfg.train.lr or method.default_lr)


def evaluate_split(p: Prepared, cfg: RunConfig, split: str, progress: bool = False,
                   with_loss: bool = True) -> tuple[dict, float, list[str] | None]:
    """Metrics and loss of the model on one split (and, for generation, the outputs)."""
    tok = p.backbone.tokenizer
    if p.generative:
        return evaluate_generation(p.model, tok, p.data[split], max_new_tokens=cfg.max_new_tokens or p.task.max_new_tokens,
                                   batch_size=min(cfg.train.eval_batch_size, 16), sampling=cfg.decoding, seed=cfg.seed,
                                   progress=progress, with_loss=with_loss)
    metrics, loss = evaluate(p.model, p.data[split], cfg.train.eval_batch_size, tok.pad_token_id, tok.padding_side)
    return metrics, loss, None


def batch_loss_fn(p: Prepared) -> Callable[[np.ndarray], tuple[torch.Tensor, int]]:
    """The training loss of a batch of training-example indices, and its token count."""
    tok, data = p.backbone.tokenizer, p.data["train"]
    if p.generative:
        def gen_loss(idx):
            b = collate_pairs(data, idx, tok.pad_token_id)
            return lm_loss(p.model, b), int(b["attention_mask"].sum())
        return gen_loss

    def cls_loss(idx):
        b = collate(data, idx, tok.pad_token_id, tok.padding_side)
        return classification_loss(p.model, b), int(b["attention_mask"].sum())
    return cls_loss


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
        save_json(out / CONFIG, dataclasses.asdict(cfg))
        best: dict = {}
        trained = set(p.trainable)

        def on_best(ep) -> None:
            state = {n: t.detach().clone() for n, t in p.model.named_parameters() if n in trained}
            best.update(epoch=ep.epoch, state=state)
            save_weights(out / WEIGHTS, state)

        t_train = time.perf_counter()
        validate = lambda: evaluate_split(p, cfg, "validation")[:2]
        history = train(p.model, p.data["train"].lengths, batch_loss_fn(p), validate, cfg.train, lr=p.lr,
                        seed=cfg.seed, metric=p.task.metric, on_best=on_best, progress=progress)
        train_seconds = time.perf_counter() - t_train
        p.model.load_state_dict(best["state"], strict=False)
        test, test_loss, outputs = evaluate_split(p, cfg, "test", progress=progress)
        if outputs is not None:
            save_predictions(out / PREDICTIONS, p.data["test"], outputs)
    n_train, n_total = count_params(p.model, p.trainable)
    best_ep = history[best["epoch"] - 1]
    record = {
        "model": cfg.model, "task": p.task.name, "method": cfg.method, "metric": p.task.metric,
        "kind": "generation" if p.generative else "classification",
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


def eval_run(run_dir: str | Path, split: str = "test", decoding: Sampling | None = None) -> dict[str, float]:
    """Metrics of a saved run on one split; generation runs may decode with other `decoding` settings."""
    if split not in ("train", "validation", "test"):
        raise PeftlabError(f"--split '{split}' is unknown; valid: train, validation, test")
    cfg, p = load_run(run_dir)
    if decoding is not None:
        cfg.decoding = decoding
    metrics, loss, _ = evaluate_split(p, cfg, split)
    return {**metrics, "loss": loss, "rows": len(p.data[split])}


@dataclass
class Generator:
    """A model ready to continue prompts: a generation run (prompts framed as in its training
    data) or a plain model (prompts as given)."""

    model: torch.nn.Module
    tokenizer: object
    frame: Callable[[list[str]], Pairs]
    max_new_tokens: int
    stop_strings: tuple[str, ...]

    def generate(self, prompts: list[str], *, max_new_tokens: int | None = None, sampling: Sampling | None = None,
                 stop_strings: tuple[str, ...] | None = None, seed: int = 0, stream: TextIO | None = None) -> list[str]:
        """Continue each prompt; with `stream`, write one prompt's text there as it is decoded."""
        pairs, n = self.frame(prompts), max_new_tokens or self.max_new_tokens
        stops = self.stop_strings if stop_strings is None else stop_strings
        if stream is None:
            return complete(self.model, self.tokenizer, pairs, max_new_tokens=n, sampling=sampling,
                            stop_strings=stops, seed=seed)
        if len(prompts) != 1:
            raise PeftlabError("streaming shows one prompt at a time; give one --prompt or --no-stream")
        printer = StreamPrinter(self.tokenizer, stops, stream)
        ids = torch.tensor([pairs.input_ids[0]])
        self.model.eval()
        generate(self.model, ids, torch.ones_like(ids), n, sampling, stop_ids=(self.tokenizer.eos_token_id,),
                 pad_id=self.tokenizer.pad_token_id, seed=seed, stop_strings=stops, tokenizer=self.tokenizer,
                 on_step=printer)
        return [printer.finish()]


class StreamPrinter:
    """Prints decoded text as tokens arrive: never past a stop string, never half a character."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], out: TextIO):
        self.tokenizer, self.stops, self.out = tokenizer, stop_strings, out
        self.ids: list[int] = []
        self.shown = ""

    def visible(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = trim_at_stop(text, self.stops)
        if len(cut) == len(text.lstrip()):  # no stop yet: hold back what may begin one
            held = max((k for s in self.stops for k in range(1, len(s)) if cut.endswith(s[:k])), default=0)
            cut = cut[:len(cut) - held]
        return cut.rstrip("\ufffd")  # a multi-byte character still arriving

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.visible()
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self) -> str:
        text = trim_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()
        return text.strip()


def load_generator(source: str | Path, *, chat: bool = False) -> Generator:
    """A trained generation run directory, or a model (embedded name, path or hub id)."""
    if Path(source, CONFIG).is_file():
        cfg, p = load_run(source)
        if not p.generative:
            raise PeftlabError(f"'{source}' is a classification run; evaluate it with `peftlab eval`")
        tok, task = p.backbone.tokenizer, p.task
        sep = (p.model.head.id,) if cfg.sep_token else ()
        frame = lambda prompts: encode_pairs(prompts, [""] * len(prompts), tok, cfg.template or task.template,
                                             cfg.max_length, keep_end=task.keep_end, sep_ids=sep, chat=cfg.chat,
                                             with_targets=False)
        return Generator(p.model, tok, frame, cfg.max_new_tokens or task.max_new_tokens, ("\n",))
    b = load_backbone(str(source))
    context = getattr(b.model.config, "max_position_embeddings", 2048)
    frame = lambda prompts: encode_pairs(prompts, [""] * len(prompts), b.tokenizer, "{text}", context, keep_end=True,
                                         chat=chat, with_targets=False)
    return Generator(LanguageModel(b.arch, b.tokenizer), b.tokenizer, frame, 64, ())


def save_predictions(path: Path, data: Pairs, outputs: list[str]) -> None:
    rows = [{"output": o, "reference": t} for o, t in zip(outputs, data.targets)]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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


