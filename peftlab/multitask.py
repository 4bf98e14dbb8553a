"""Several classification tasks on one backbone: a named head per task, rows routed to their
head (and soft prompt), a task sampler for joint training, freeze policies, transfer.

    peftlab train --task cola,sst2 --method head --freeze backbone          # heads only
    peftlab train --task cola,sst2 --method prompt --head label-words --freeze network
    peftlab train --task cola,sst2 --method lora --freeze head:cola --init-from runs/mt

Every row carries a task id; heads have their own label sets, so logits come back padded to the
widest one (the padding at the dtype's minimum, never chosen, zero gradient).
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from peftlab.arch import Arch
from peftlab.batching import Encoded, batch_indices
from peftlab.data import Task
from peftlab.errors import PeftlabError
from peftlab.heads import Classifier, LabelWords
from peftlab.methods import trainable_names
from peftlab.methods.lora import lora_layers, per_row
from peftlab.methods.prompt import SoftPrompt
from peftlab.metrics import classification_metrics
from peftlab.speed import in_fp32

SAMPLERS = ("proportional", "uniform", "temperature")


@dataclass
class MultiTask:
    """Several loaded tasks trained together; `metric` picks checkpoints by the mean task metric."""

    tasks: list[Task]
    metric: str = "combined"

    def __post_init__(self) -> None:  # a task's name keys its head, prompt, adapter and metrics
        names = [t.name for t in self.tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PeftlabError(f"--task names '{twice[0]}' twice (tasks are named by their file or folder name); "
                               "give each task a distinct name, e.g. rename a folder")
        dotted = [n for n in names if "." in n]
        if dotted:
            raise PeftlabError(f"task name '{dotted[0]}' contains '.', which a multi-task model cannot key a head "
                               "by; rename the file or folder without dots")

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.tasks)


class TaskPrompts(nn.Module):
    """One soft prompt per task; `route` (task ids of the current rows) picks each row's."""

    def __init__(self, prompt: SoftPrompt, tasks: list[str]):
        super().__init__()
        self.n = prompt.n
        self.prompts = nn.ModuleDict({t: SoftPrompt(prompt.n, prompt.embedding.weight.detach()) for t in tasks})
        self.route: torch.Tensor | None = None

    @property
    def same_in_every_row(self) -> bool:
        """Whether the current rows are all one task's (training batches are): one prompt, which a
        batch may then compute once (`virtual.shares_rows`, asking for `self(1)`)."""
        return self.route is not None and bool((self.route == self.route[0]).all())

    def forward(self, batch_size: int) -> torch.Tensor:
        route = self.route[:1] if batch_size == 1 and self.same_in_every_row else self.route
        if route is None or batch_size % len(route):
            raise PeftlabError("per-task soft prompts need each row's task: call the model with task_ids")
        table = torch.stack([p.embedding.weight for p in self.prompts.values()])  # (tasks, n, H)
        # multi-token label words score each row once per label, rows repeated in place
        return table[route.repeat_interleave(batch_size // len(route))]


class MultiTaskClassifier(Classifier):
    """One body, one head per task (linear, or label-word scoring with the task's words)."""

    def __init__(self, arch: Arch, tasks: list[Task], pooling: str = "auto", tokenizer=None,
                 label_words: bool = False, bidirectional: bool = False):
        super().__init__(arch, 1, pooling, tokenizer, None, bidirectional)
        if label_words and bidirectional:
            raise PeftlabError("--bidirectional cannot score label words; use --head linear")
        self.task_names = [t.name for t in tasks]
        self.num_labels = [t.num_labels for t in tasks]
        heads: dict[str, nn.Module] = {}
        for t in tasks:
            if label_words:
                heads[t.name] = LabelWords(arch, tokenizer, t.words)
            else:
                heads[t.name] = nn.Linear(arch.hidden_size, t.num_labels)
                nn.init.normal_(heads[t.name].weight, std=arch.hidden_size**-0.5)
                nn.init.zeros_(heads[t.name].bias)
        self.head = nn.ModuleDict(heads)
        self.label_words = label_words
        self.task_adapters = False  # per_task_adapters(): rows run through their task's LoRA adapter

    def per_task(self, method, adapters: bool = False) -> list[str]:
        """After a method is applied: one soft prompt per task (if it added one) and, with
        `adapters`, one LoRA adapter per task. Returns the names of what trains."""
        self.per_task_prompts()
        names = trainable_names(self, method)
        return self.per_task_adapters(names) if adapters else names

    def per_task_adapters(self, names: list[str]) -> list[str]:
        """Give every task its own copy of the LoRA adapter a method added (rows then run through
        their task's); returns the trainable names, the shared adapter's swapped for the copies."""
        layers = lora_layers(self.body)
        if not layers or any(list(layer.lora_A) != ["default"] for layer in layers):
            raise PeftlabError("--per-task-adapters needs one LoRA adapter to copy: use --method lora (or a mix with it)")
        for layer in layers:
            for t in self.task_names:
                layer.copy_adapter("default", t)
            layer.delete("default")
        self.task_adapters = True
        shared = [n for n in names if ".lora_A.default." in n or ".lora_B.default." in n]
        copies = [n.replace(".default.", f".{t}.") for n in shared for t in self.task_names]
        return [n for n in names if n not in shared] + copies

    def per_task_prompts(self) -> None:
        """Give every task its own copy of the soft prompt a method added (prompt tuning)."""
        if isinstance(self.prompt, SoftPrompt):
            self.prompt = TaskPrompts(self.prompt, self.task_names)

    @property
    def reads_features(self) -> bool:
        return not self.label_words

    def _padded(self, task_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return like.new_full((len(task_ids), max(self.num_labels)), torch.finfo(like.dtype).min)

    def classify(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        features = features.float()
        out = self._padded(task_ids, features)
        for k in task_ids.unique().tolist():
            rows = task_ids == k
            with in_fp32(features):  # see speed.in_fp32
                out[rows, :self.num_labels[k]] = self.head[self.task_names[k]](features[rows])
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            raise PeftlabError("a multi-task model needs task_ids: one task index per row")
        if self.task_adapters:
            with per_row(self, [self.task_names[k] for k in task_ids.tolist()]):
                return self._forward(input_ids, attention_mask, task_ids)
        return self._forward(input_ids, attention_mask, task_ids)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        prompts = self.prompt if isinstance(self.prompt, TaskPrompts) else None
        if not self.label_words:
            if prompts is not None:
                prompts.route = task_ids
            return self.classify(self.features(input_ids, attention_mask), task_ids)
        out = None
        for k in task_ids.unique().tolist():  # each task scores its own words: one pass per task
            rows = task_ids == k
            if prompts is not None:
                prompts.route = task_ids[rows]
            scores = self.head[self.task_names[k]](self, input_ids[rows], attention_mask[rows])
            out = self._padded(task_ids, scores) if out is None else out
            out[rows, :self.num_labels[k]] = scores
        return out


def join(parts: list[Encoded]) -> Encoded:
    """Several tasks' examples as one split; `task_ids` says whose each row is (one task: as it is)."""
    if len(parts) == 1:
        return parts[0]
    return Encoded([x for p in parts for x in p.input_ids], np.concatenate([p.labels for p in parts]),
                   truncated=sum(p.truncated for p in parts),
                   task_ids=np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)]))


def task_weights(sizes: list[int], sampler: str, temperature: float) -> np.ndarray:
    """How often each task is drawn: proportional to its size n, uniform, or to n^(1/T)."""
    n = np.asarray(sizes, dtype=np.float64)
    if sampler == "proportional":
        w = n
    elif sampler == "uniform":
        w = np.ones_like(n)
    elif sampler == "temperature":
        if temperature <= 0:
            raise PeftlabError(f"--sampler-temperature must be positive, got {temperature}")
        w = n ** (1.0 / temperature)
    else:
        raise PeftlabError(f"--sampler '{sampler}' is unknown; valid: {', '.join(SAMPLERS)}")
    return w / w.sum()


def learning_tasks(model: nn.Module, trainable: list[str]) -> list[int]:
    """The tasks whose loss reaches a trainable parameter: all, unless the body is frozen and
    some heads are too (a frozen head on frozen features has nothing to learn from)."""
    if any(not n.startswith("head.") for n in trainable):
        return list(range(len(model.task_names)))
    return [k for k, t in enumerate(model.task_names) if any(n.startswith(f"head.{t}.") for n in trainable)]


def plan_batches(enc: Encoded, batch_size: int, *, sampler: str, temperature: float, seed: int,
                 bucket: bool = True, tasks: list[int] | None = None) -> list[np.ndarray]:
    """One epoch of single-task batches (as many as the tasks' batches in all), tasks drawn by
    the sampler. Proportional takes every batch once; the others repeat small tasks' batches
    and leave some of the large ones' out. `tasks`: train on these task indices only."""
    rng = np.random.default_rng(seed)
    names = np.unique(enc.task_ids) if tasks is None else np.asarray(tasks)
    per_task = []
    for k in names:
        rows = np.flatnonzero(enc.task_ids == k)
        per_task.append([rows[b] for b in batch_indices(enc.lengths[rows], batch_size, shuffle=True,
                                                        seed=seed + int(k), bucket=bucket)])
    total = sum(map(len, per_task))
    if sampler == "proportional":
        batches = [b for bs in per_task for b in bs]
        return [batches[i] for i in rng.permutation(total)]
    p = task_weights([int((enc.task_ids == k).sum()) for k in names], sampler, temperature)
    draws, cursor, out = rng.choice(len(names), size=total, p=p), [0] * len(names), []
    for k in draws:
        bs = per_task[k]
        if cursor[k] == len(bs):  # a task ran out: go round again in a new order
            bs[:] = [bs[i] for i in rng.permutation(len(bs))]
            cursor[k] = 0
        out.append(bs[cursor[k]])
        cursor[k] += 1
    return out


def multi_metrics(logits: np.ndarray, enc: Encoded, tasks: list[Task]) -> dict[str, float]:
    """Each task's metrics on its own rows ('cola/mcc', ...) and `combined`: the mean of each
    task's own metric (MCC for CoLA, accuracy for SST-2, ...)."""
    out: dict[str, float] = {}
    for k, t in enumerate(tasks):
        rows = enc.task_ids == k
        m = classification_metrics(logits[rows, :t.num_labels].argmax(-1), enc.labels[rows])
        out.update({f"{t.name}/{name}": v for name, v in m.items()})
    out["combined"] = float(np.mean([out[f"{t.name}/{t.metric}"] for t in tasks]))
    return out


FREEZE_POLICIES = "backbone, network, head:TASK (comma-separated)"


def apply_freeze(model: nn.Module, names: list[str], policies: str | None, pretrained: set[str],
                 task_names: list[str]) -> list[str]:
    """The trainable names after the freeze policies; clear errors where a method contradicts one.

      backbone   no pretrained weight trains (heads and the method's own modules do)
      network    nothing but virtual tokens trains: soft prompts / prefixes (label-word heads)
      head:T     task T's head stays as it is
    """
    if not policies:
        return names
    keep = list(names)
    for policy in (p.strip() for p in policies.split(",") if p.strip()):
        if policy == "backbone":
            bad = [n for n in keep if n in pretrained]
            if bad:
                raise PeftlabError(f"--freeze backbone, but the method trains pretrained weights (e.g. {bad[0]}); "
                                   "use head, lora, prompt, prefix, adapter or ia3 with it")
        elif policy == "network":
            bad = [n for n in keep if not n.startswith(("prompt.", "prefix."))]
            if bad:
                raise PeftlabError(f"--freeze network keeps only soft prompts / prefixes training, but {bad[0]} "
                                   "would train; use --method prompt (or prefix) with --head label-words")
        elif policy.startswith("head:"):
            task = policy[5:]
            if task not in task_names:
                raise PeftlabError(f"--freeze {policy}: no task '{task}' here; tasks: {', '.join(task_names)}")
            prefix = f"head.{task}." if len(task_names) > 1 or isinstance(model.head, nn.ModuleDict) else "head."
            keep = [n for n in keep if not n.startswith(prefix)]
        else:
            raise PeftlabError(f"--freeze '{policy}' is unknown; valid: {FREEZE_POLICIES}")
    return keep
