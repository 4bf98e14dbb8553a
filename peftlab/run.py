"""One run: load a backbone and a task, apply a method, train, evaluate, write a run directory.

A run directory holds:
  config.json            the resolved RunConfig
  metrics.json           test and best validation metrics, parameter counts, time, memory, history
  trainable.safetensors  the trained parameters (method's and head's) of the best epoch
  checkpoint.safetensors while training: the latest training state (weights, optimizer, RNG,
                         position) for `--resume`; removed when the run finishes
"""

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from peftlab import parallel
from peftlab.batching import Encoded, encode
from peftlab.checkpoint import atomic_write_text, check_free_space, load_checkpoint, load_json, load_weights, \
    missing_folders, no_empty_folder, save_checkpoint, save_json, save_weights
from peftlab.data import Task, load_task, per_class, subset
from peftlab.errors import Interrupted, PeftlabError
from peftlab.features import FeatureCache, build_caches, cut_point
from peftlab.generation import GenTask, Pairs, collate_pairs, encode_pairs, evaluate_generation, \
    is_generation, lm_loss, load_gen_task
from peftlab.heads import Classifier, LanguageModel
from peftlab.measure import PeakMemory, count_params, machine, versions
from peftlab.methods import parse_method, positions, set_trainable, trainable_names
from peftlab.models import Backbone, load_backbone, same_model
from peftlab.multitask import MultiTask, MultiTaskClassifier, apply_freeze, join, learning_tasks, multi_metrics, \
    plan_batches
from peftlab.runconfig import RunConfig, warn_unread
from peftlab.speed import tune_allocator
from peftlab.train import TensorBoard, evaluate, logits_fn, train

CONFIG, METRICS, WEIGHTS = "config.json", "metrics.json", "trainable.safetensors"
CHECKPOINT = "checkpoint.safetensors"
PREDICTIONS = "predictions.jsonl"  # each test row's input, the model's output and the reference


@dataclass
class Prepared:
    """A run's model and data, built but not trained."""

    backbone: Backbone
    model: Classifier | LanguageModel
    task: Task | GenTask | MultiTask
    data: dict[str, Encoded] | dict[str, Pairs]
    trainable: list[str]
    lr: float
    carried: list[str] = field(default_factory=list)  # tensors taken from --init-from (saved with the run)
    caches: dict[str, FeatureCache] = field(default_factory=dict)  # per split, when the bottom is frozen

    @property
    def generative(self) -> bool:
        return isinstance(self.task, GenTask)

    @property
    def multi(self) -> bool:
        return isinstance(self.task, MultiTask)


def task_names(cfg: RunConfig) -> list[str]:
    return [t.strip() for t in cfg.task.split(",") if t.strip()]


def prepare(cfg: RunConfig, backbone: Backbone | None = None, transfer: bool = True) -> Prepared:
    """Load (or reuse) the backbone, load and tokenize the task(s), apply the method, freeze the rest."""
    method = parse_method(cfg.method, cfg.method_args)  # fail fast, before any loading
    names = task_names(cfg)
    generative = is_generation(cfg.task, cfg.target_column)
    if len(names) > 1:
        if cfg.target_column or any(is_generation(n, None) for n in names):
            raise PeftlabError(f"--task {cfg.task}: multi-task runs take classification tasks only")
        if cfg.label_words or cfg.template:
            raise PeftlabError("--label-words and --template are per task; multi-task runs use each task's own")
        task = MultiTask([load_task(n, text_column=cfg.text_column, label_column=cfg.label_column, seed=cfg.seed)
                          for n in names])
    elif generative:
        if cfg.train_per_class:
            raise PeftlabError("--train-per-class needs labels; generation tasks take --train-limit")
        task = load_gen_task(cfg.task, input_column=cfg.input_column, target_column=cfg.target_column, seed=cfg.seed)
    else:
        task = load_task(cfg.task, text_column=cfg.text_column, label_column=cfg.label_column, seed=cfg.seed)
    backbone = backbone or load_backbone(cfg.model, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    _check_context(cfg, method, backbone.model.config)
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
        words = cfg.head == "label-words"
        tasks = task.tasks if isinstance(task, MultiTask) else [task]
        label_words = [tuple(w.strip() for w in cfg.label_words.split(",")) if cfg.label_words else t.words
                       for t in tasks] if words else None
        templates = [cfg.template or (t.template if words else "{text}") for t in tasks]

        def encode_split(t: Task, split: str, template: str) -> Encoded:
            if split == "train" and cfg.train_per_class:
                ds = per_class(t.splits[split], cfg.train_per_class, cfg.seed)
            else:
                ds = subset(t.splits[split], limits[split], cfg.seed)
            return encode(ds["text"], ds["label"], tok, cfg.max_length, f"{t.name} {split}", template)
        data = {split: join([encode_split(t, split, tpl) for t, tpl in zip(tasks, templates)])
                for split in ("train", "validation", "test")}
        torch.manual_seed(cfg.seed)
        if isinstance(task, MultiTask):
            model = MultiTaskClassifier(backbone.arch, tasks, cfg.pooling, tok, words, cfg.bidirectional)
        else:
            model = Classifier(backbone.arch, task.num_labels, cfg.pooling, tok,
                               label_words[0] if words else None, cfg.bidirectional)
    pretrained = {id(p) for p in model.body.parameters()}
    method.apply(model)
    if isinstance(model, MultiTaskClassifier):
        trainable = model.per_task(method, adapters=cfg.per_task_adapters)
    elif cfg.per_task_adapters:
        raise PeftlabError("--per-task-adapters needs several tasks (--task a,b)")
    else:
        trainable = trainable_names(model, method)
    pretrained_names = {n for n, p in model.named_parameters() if id(p) in pretrained}
    trainable = apply_freeze(model, trainable, cfg.freeze, pretrained_names,
                             [t.name for t in getattr(task, "tasks", [task])])
    carried = load_transfer(model, cfg) if cfg.init_from and transfer else []
    if not trainable:
        raise PeftlabError(f"method '{cfg.method}' with --head {cfg.head}{' --freeze ' + cfg.freeze if cfg.freeze else ''}"
                           " trains nothing; pick a method that adds parameters (e.g. prompt, lora) or use --head linear")
    set_trainable(model, trainable)
    return Prepared(backbone, model, task, data, trainable, cfg.train.lr or method.default_lr, carried)


def _check_context(cfg: RunConfig, method, config) -> None:
    """Texts of --max-length tokens plus the virtual tokens must fit the model's positions."""
    context = getattr(config, "max_position_embeddings", None)
    virtual = positions(method)
    if context and virtual < context < cfg.max_length + virtual:  # (too many virtual tokens alone: the method says)
        plus = f" + {virtual} virtual tokens" if virtual else ""
        raise PeftlabError(f"--max-length {cfg.max_length}{plus} exceeds {cfg.model}'s {context}-position context; "
                           f"use --max-length {context - virtual} or less")


def load_transfer(model: torch.nn.Module, cfg: RunConfig) -> list[str]:
    """Load a finished run's trained tensors into this model (transfer); returns their names.

    A single-task source's head becomes that task's head here; tasks new to the source keep
    their fresh heads. Every source tensor must find its place (same method, same sizes).
    """
    src = Path(cfg.init_from)
    if not (src / METRICS).is_file():
        raise PeftlabError(f"--init-from '{src}' is not a finished run (no {METRICS}); train it to the end first")
    record = load_json(src / METRICS)
    if not same_model(str(record.get("model")), cfg.model):
        raise PeftlabError(f"--init-from '{src}' was trained on '{record.get('model')}', but this run uses "
                           f"'{cfg.model}'; transfer needs the same base model")
    src_tasks = list(record["tasks"]) if record.get("kind") == "multitask" else [record["task"]]
    weights = load_weights(src / WEIGHTS)
    if isinstance(model, MultiTaskClassifier) and len(src_tasks) == 1:
        weights = {n.replace("head.", f"head.{src_tasks[0]}.", 1) if n.startswith("head.") else n: t
                   for n, t in weights.items()}
    params = dict(model.named_parameters())
    for name, t in weights.items():
        if name not in params:
            raise PeftlabError(f"--init-from '{src}': its tensor {name} has no place in this model; use the same "
                               f"method as that run ({record['method']})")
        if params[name].shape != t.shape:
            raise PeftlabError(f"--init-from '{src}': {name} is {tuple(t.shape)} there, {tuple(params[name].shape)} "
                               "here (another label set?)")
    model.load_state_dict(weights, strict=False)
    return sorted(weights)


def attach_caches(p: Prepared, cfg: RunConfig, progress: bool = True) -> None:
    """With --cache-features auto: when the bottom of the network is frozen, compute (or load)
    its features for every split, so training and evaluation run the top only."""
    if cfg.cache_features == "off" or p.generative:
        return
    point = cut_point(p.model)
    if point is not None:
        p.caches = build_caches(p.model, p.data, p.backbone.tokenizer, point, batch_size=cfg.train.eval_batch_size,
                                progress=progress, precision=cfg.train.precision)


def evaluate_split(p: Prepared, cfg: RunConfig, split: str, progress: bool = False,
                   with_loss: bool = True) -> tuple[dict, float, list[str] | None]:
    """Metrics and loss of the model on one split, and its outputs: decoded texts, or predicted
    label names (None for multi-task splits, whose rows belong to different label sets)."""
    tok = p.backbone.tokenizer
    if p.generative:
        return evaluate_generation(p.model, tok, p.data[split], max_new_tokens=cfg.max_new_tokens or p.task.max_new_tokens,
                                   batch_size=min(cfg.train.eval_batch_size, 16), sampling=cfg.decoding, seed=cfg.seed,
                                   progress=progress, with_loss=with_loss, precision=cfg.train.precision)
    enc = p.data[split]
    score = (lambda logits: multi_metrics(logits, enc, p.task.tasks)) if p.multi else None
    metrics, loss, logits = evaluate(p.model, enc, cfg.train.eval_batch_size, tok.pad_token_id, tok.padding_side,
                                     p.caches.get(split), cfg.train.precision, score)
    return metrics, loss, None if p.multi else [p.task.labels[i] for i in logits.argmax(-1)]


def batch_loss_fn(p: Prepared) -> Callable[[np.ndarray], tuple[torch.Tensor, int]]:
    """The training loss of a batch of training-example indices, and its token count."""
    tok, data = p.backbone.tokenizer, p.data["train"]
    if p.generative:
        def gen_loss(idx):
            b = collate_pairs(data, idx, tok.pad_token_id)
            return lm_loss(p.model, b), int(b["attention_mask"].sum())
        return gen_loss
    logits = logits_fn(p.model, data, tok.pad_token_id, tok.padding_side, p.caches.get("train"))

    def cls_loss(idx):
        return F.cross_entropy(logits(idx), torch.as_tensor(data.labels[idx])), int(data.lengths[idx].sum())
    return cls_loss


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tasks = "_".join(Path(t).stem for t in task_names(cfg))
    name = f"{Path(cfg.model).stem}-{tasks}-{cfg.method}-{stamp}".replace("+", "_")
    return Path("runs") / name


def train_run(cfg: RunConfig, *, backbone: Backbone | None = None, progress: bool = True,
              resume: bool = False, check_settings: bool = True) -> dict:
    """Train and evaluate one run; write its directory. Returns the metrics record.

    resume: continue from the run directory's checkpoint when it has one (else start afresh).
    check_settings: warn about settings the method ignores (callers that run many configs warn once).
    Under torchrun every process calls this; rank 0 alone writes the run directory.
    """
    parallel.init()
    tune_allocator()  # before the feature cache and evaluations, not only the training loop
    if check_settings:
        warn_unread(cfg)
    main = parallel.is_main()
    out = Path(cfg.out) if cfg.out else parallel.gather_objects(default_run_dir(cfg))[0]  # rank 0's name
    new = parallel.gather_objects(missing_folders(out))[0]  # rank 0's view, before any process makes them
    _check_writable(out)
    ckpt_path = out / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    t_start = time.perf_counter()
    with PeakMemory() as mem:
        with no_empty_folder(new if main else []):
            p = prepare(cfg, backbone)
            _check_space(out, p)
        if main:
            save_json(out / CONFIG, dataclasses.asdict(cfg.portable()))
        strategy = parallel.resolve(cfg.train.parallel, p.model)
        if parallel.rank():  # dropout draws differ between processes (rank 0's match one process's)
            torch.manual_seed(cfg.seed + parallel.rank())
        t_cache = time.perf_counter()
        if strategy != "fsdp":  # sharded weights are read through the root's forward only
            with parallel.first(main):  # rank 0 computes the feature files, the others then read them
                attach_caches(p, cfg, progress and main)
        cache_seconds = time.perf_counter() - t_cache
        saved = set(p.trainable) | set(p.carried)  # transferred tensors travel with the run
        best: dict = {}
        if ckpt and ckpt[1]["position"]["best_epoch"]:  # the best epoch's weights were written before
            best.update(epoch=ckpt[1]["position"]["best_epoch"], state=load_weights(out / WEIGHTS))
        batch_loss = parallel.wrap(p.model, batch_loss_fn(p), strategy, unused=p.multi)

        def on_best(ep) -> None:
            state = parallel.full_state(p.model, saved)
            best.update(epoch=ep.epoch, state=state)
            if main:
                save_weights(out / WEIGHTS, state)

        validate = lambda: evaluate_split(p, cfg, "validation")[:2]
        initial = validate()[0] if p.multi else None  # where each task starts: frozen heads are judged by it
        plan = None
        if p.multi:
            tasks = learning_tasks(p.model, p.trainable)
            plan = lambda epoch: plan_batches(p.data["train"], cfg.train.batch_size, sampler=cfg.sampler,
                                              temperature=cfg.sampler_temperature, seed=cfg.seed + epoch,
                                              bucket=cfg.train.bucket, tasks=tasks)
        log = TensorBoard(out) if cfg.tensorboard and main else None
        kept = ckpt[1]["position"] if ckpt else None  # where a resume would start: said on Ctrl-C

        def save(c) -> None:
            nonlocal kept
            if main:
                save_checkpoint(ckpt_path, *c)
            kept = c[1]["position"]

        t_train = time.perf_counter()
        try:
            end = train(p.model, p.data["train"].lengths, batch_loss, validate, cfg.train, lr=p.lr,
                        seed=cfg.seed, metric=p.task.metric, on_best=on_best, progress=progress, plan=plan,
                        also=tuple(f"{t.name}/{t.metric}" for t in p.task.tasks) if p.multi else (),
                        save=save, resume=ckpt,
                        weight=p.data["train"].target_tokens if p.generative else len, **(log.hooks() if log else {}))
            train_seconds = time.perf_counter() - t_train
            if log:
                log.close()
            parallel.load_state(p.model, best["state"])
            t_test = time.perf_counter()
            test, test_loss, outputs = evaluate_split(p, cfg, "test", progress=progress and main)
        except KeyboardInterrupt:
            raise Interrupted(_resume_hint(out, kept)) from None
        history = end.history
        if main and test.get("mcc") == 0.0:  # e.g. every row given one class: accuracy alone hides it
            hint = " or, on a causal LM, --head label-words" if cfg.head == "linear" and p.model.arch.causal else ""
            warnings.warn(f"the test predictions carry no information about the labels (MCC 0, accuracy "
                          f"{100 * test.get('accuracy', 0):.1f}%): the model has not learned the task yet; train longer "
                          f"(--epochs, more rows), raise --lr / --head-lr{hint}")
        test_seconds = time.perf_counter() - t_test
        if outputs is not None and main:
            save_predictions(out / PREDICTIONS, p, "test", outputs)
    [peak_mb] = parallel.all_max(mem.peak_mb)
    n_train, n_total = count_params(p.model, p.trainable)
    best_ep = history[best["epoch"] - 1]
    kind = "generation" if p.generative else "multitask" if p.multi else "classification"
    record = {
        "model": cfg.model, "task": p.task.name, "method": cfg.method, "metric": p.task.metric, "kind": kind,
        "test": test, "test_loss": test_loss, "validation": best_ep.val, "best_epoch": best["epoch"],
        "trainable_params": n_train, "total_params": n_total, "trainable_pct": 100 * n_train / n_total,
        "lr": p.lr, "train_rows": len(p.data["train"]), "test_rows": len(p.data["test"]),
        "truncated_texts": {s: e.truncated for s, e in p.data.items()},
        # over every process that ran the loop: a resumed run counts its earlier training too
        "skipped_batches": end.skipped, "resumes": end.resumes, "train_time_s": end.elapsed,
        "wall_time_s": time.perf_counter() - t_start + end.elapsed - train_seconds,
        "time_per_epoch_s": [e.seconds for e in history], "test_time_s": test_seconds,
        "tokens_per_s": sum(e.tokens for e in history) / max(1e-9, sum(e.seconds for e in history)),
        "peak_memory_mb": peak_mb, "adapter_bytes": (out / WEIGHTS).stat().st_size if main else None,
        "processes": parallel.world(), "parallel": strategy,
        "cached_features": {"cut": next(iter(p.caches.values())).point, "seconds": cache_seconds} if p.caches else None,
        "history": [dataclasses.asdict(e) for e in history],
        "run_dir": str(out), "versions": versions(), "machine": machine(),
    }
    if p.multi:
        record["tasks"] = {t.name: t.metric for t in p.task.tasks}
        record["initial_validation"] = initial
        record["frozen"] = cfg.freeze
    if main:
        save_json(out / METRICS, record)
        ckpt_path.unlink(missing_ok=True)  # the run is finished: its record and best weights are what stays
    parallel.barrier()  # the run directory is complete before any process returns
    return record


def _resume_hint(out: Path, kept: dict | None) -> str:
    if kept is None:
        return (f"nothing was saved before the first checkpoint (written at each epoch's end, and every "
                f"--save-every steps when set); `peftlab train --resume {out}` starts the run again with its settings")
    return (f"the run is saved in '{out}' at epoch {kept['epoch'] + 1}, batch {kept['batch']}: "
            f"`peftlab train --resume {out}` continues from there")


def save_predictions(path: Path, p: Prepared, split: str, outputs: list[str]) -> None:
    """One JSON line a row: the input as the model read it (prompt, or framed and truncated text),
    the model's output (decoded text, or predicted label) and the reference."""
    data, tok = p.data[split], p.backbone.tokenizer
    if p.generative:
        inputs = tok.batch_decode([ids[:n] for ids, n in zip(data.input_ids, data.prompt_len)], skip_special_tokens=True)
        refs = data.targets
    else:
        inputs = tok.batch_decode(data.input_ids, skip_special_tokens=True)
        refs = [p.task.labels[i] for i in data.labels]
    rows = [{"input": i, "output": o, "reference": r} for i, o, r in zip(inputs, outputs, refs)]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{parallel.rank()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PeftlabError(f"cannot write to run directory '{out}' ({e.strerror}); choose another with --out") from e
    if (out / METRICS).exists():
        raise PeftlabError(f"'{out}' already holds a finished run; choose a new --out or delete it")


def _check_space(out: Path, p: Prepared) -> None:
    # a checkpoint holds the trained tensors and AdamW's two moments; a write needs room for the
    # new file beside the old one, plus the best epoch's weights
    params = dict(p.model.named_parameters())
    weights = sum(params[n].numel() * params[n].element_size() for n in p.trainable)
    check_free_space(out, 2 * 3 * weights + weights + 16 * 2**20, "the run's checkpoints")
