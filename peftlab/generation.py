"""Generation tasks: prompt -> target pairs, their batches, the LM loss, and decoding a split.

A row is rendered as  prompt (the template around its input) + [separator] + target + EOS.
The loss covers the target and EOS only: labels are -100 on prompt and padding positions, and
where the prompt ends is counted in tokens of the tokenized prompt, never in characters. EOS
after the target teaches the model to stop. Inputs too long for --max-length are shortened (the
template, separator and target always stay whole).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from peftlab import parallel
from peftlab.batching import batch_indices, check_template, eval_batches, fill, fit_template, pad_rows
from peftlab.data import data_roots, task_folder
from peftlab.decode import Sampling, generate, trim_at_stop
from peftlab.errors import PeftlabError, unknown
from peftlab.files import FORMATS, SPLITS, missing_column, read_file, read_folder, split_one, value_kind
from peftlab.methods.lora import inference_weights
from peftlab.metrics import generation_metrics
from peftlab.speed import autocast



@dataclass(frozen=True)
class GenSpec:
    """A built-in generation task: where its rows are and how they become prompt and target."""

    name: str
    folder: str
    template: str  # frames the input text; holds {text}
    text: Callable[[dict], str]  # the row's input (the part shortened when too long)
    target: str  # the target column
    metric: str  # picks the best epoch
    max_new_tokens: int
    keep_end: bool = False  # shorten long inputs from the front (bAbI: the question is last)
    rows: Callable[[dict], bool] = lambda r: True


def _babi(task: int | None) -> GenSpec:
    name = "babi" if task is None else f"babi{task}"
    return GenSpec(name, "babi", "{text}\nAnswer:", lambda r: f"{r['context']}\nQuestion: {r['question']}",
                   "answer", "exact_match", 8, keep_end=True,
                   rows=(lambda r: True) if task is None else (lambda r: r["task"] == task))


GEN_TASKS: dict[str, GenSpec] = {
    "xsum": GenSpec("xsum", "xsum", "Summarize the article in one sentence.\n\nArticle: {text}\n\nSummary:",
                    lambda r: r["document"], "summary", "rougeL", 48),
    "babi": _babi(None), **{f"babi{t}": _babi(t) for t in (1, 2, 3, 6)},
}
LOCAL_TEMPLATE = "Input: {text}\nOutput:"


@dataclass
class GenTask:
    """A loaded generation task: splits with `text` (the input) and `target` columns."""

    name: str
    metric: str
    template: str
    max_new_tokens: int
    keep_end: bool
    splits: dict[str, Dataset] = field(repr=False)


def is_generation(task: str, target_column: str | None = None) -> bool:
    return task in GEN_TASKS or target_column is not None


def load_gen_task(task: str, *, input_column: str | None = None, target_column: str | None = None,
                  seed: int = 0) -> GenTask:
    """A built-in generation task by name, or a local file/folder with input and target columns."""
    spec = GEN_TASKS.get(task)
    if spec is not None:
        folder = task_folder(spec.folder)
        if folder is None:
            raise PeftlabError(f"task '{task}' was not found under {', '.join(map(str, data_roots()))}; set "
                               f"PEFTLAB_DATA to a folder holding {spec.folder}/train.jsonl")
        raw = read_folder(folder)
        try:
            splits = {s: _render(raw[s].filter(spec.rows), s, spec.text, spec.target) for s in SPLITS}
        except KeyError as e:
            raise PeftlabError(f"the {task} files in '{folder}' lack the column {e}; restore the original "
                               f"{spec.folder} files") from None
        return GenTask(spec.name, spec.metric, spec.template, spec.max_new_tokens, spec.keep_end, splits)
    path = Path(task)
    if not (path.is_dir() or path.is_file()):
        if path.suffix in FORMATS:
            raise PeftlabError(f"data file '{task}' does not exist; check the path")
        raise unknown("generation task", task, list(GEN_TASKS), "or give a data file or folder with "
                      "--input-column and --target-column")
    if not input_column or not target_column:
        raise PeftlabError("a local generation data set needs --input-column and --target-column, e.g. "
                           "--input-column question --target-column answer")
    if input_column == target_column:
        raise PeftlabError(f"--input-column and --target-column are both '{input_column}'; name two columns")
    raw = read_folder(path) if path.is_dir() else split_one(read_file(path), seed)
    for s in SPLITS:
        for col, flag in ((input_column, "--input-column"), (target_column, "--target-column")):
            if col not in raw[s].column_names:
                raise missing_column(s, col, raw[s].column_names, flag)
    splits = {s: _render(raw[s], s, lambda r: r[input_column], target_column) for s in SPLITS}
    return GenTask(path.stem, "rougeL", LOCAL_TEMPLATE, 64, False, splits)


def _render(ds: Dataset, split: str, text: Callable[[dict], str], target: str) -> Dataset:
    rows = [(text(r), r[target]) for r in ds]
    for i, (x, y) in enumerate(rows):
        for what, v in (("input", x), ("target", y)):
            if not isinstance(v, str):
                raise PeftlabError(f"{split} row {i}: the {what} is {value_kind(v)}, not a string; fix or drop the row")
    if not rows:
        raise PeftlabError(f"the {split} split has no rows; give it at least one")
    return Dataset.from_dict({"text": [x for x, _ in rows], "target": [y for _, y in rows]})


@dataclass
class Pairs:
    """One split, tokenized: prompt (+ target + EOS) ids per row and where each prompt ends."""

    input_ids: list[list[int]]
    prompt_len: list[int]
    targets: list[str]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def prompts(self) -> "Pairs":
        """The same rows without their targets: what decoding starts from."""
        return Pairs([x[:n] for x, n in zip(self.input_ids, self.prompt_len)], self.prompt_len, self.targets)

    def target_tokens(self, idx: np.ndarray) -> int:
        """How many tokens of rows `idx` the LM loss scores (each but a row's first is predicted)."""
        return sum(len(self.input_ids[i]) - max(1, self.prompt_len[i]) for i in idx)


def encode_pairs(texts: list[str], targets: list[str], tokenizer, template: str, max_length: int, *,
                 keep_end: bool = False, sep_ids: tuple[int, ...] = (), chat: bool = False,
                 max_target_tokens: int = 128, with_targets: bool = True) -> Pairs:
    """Tokenize prompt + separator + target + EOS; shorten inputs so that each row fits max_length."""
    check_template(template)
    if chat:  # the instruct model's own chat format around the framed input
        template = tokenizer.apply_chat_template([{"role": "user", "content": template}],
                                                 add_generation_prompt=True, tokenize=False)
    special = not chat  # a chat string already holds its special tokens
    eos = tokenizer.eos_token_id
    ids, plens, cut = [], [], 0
    for text, target in zip(texts, targets):
        tgt = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"][:max_target_tokens] + [eos]
        budget = max_length - len(sep_ids) - (len(tgt) if with_targets else 0)
        prompt = tokenizer(fill(template, text), add_special_tokens=special)["input_ids"]
        if len(prompt) > budget:
            prompt, cut = fit_template(template, text, tokenizer, budget, keep_end, special), cut + 1
        prompt = prompt + list(sep_ids)
        ids.append(prompt + tgt if with_targets else prompt)
        plens.append(len(prompt))
    return Pairs(ids, plens, list(targets), cut)


def collate_pairs(data: Pairs, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ids and mask, and labels: the target tokens, -100 on prompt and padding."""
    rows = [torch.as_tensor(data.input_ids[i], dtype=torch.long) for i in idx]
    ids, mask = pad_rows(rows, "left", pad_id)
    targets = [torch.cat([torch.full((data.prompt_len[i],), -100), r[data.prompt_len[i]:]]) for i, r in zip(idx, rows)]
    return {"input_ids": ids, "attention_mask": mask, "labels": pad_rows(targets, "left", -100)[0]}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each labelled token given the ones before it.

    The LM head runs only on positions that predict a label: with a 49k vocabulary, projecting
    every prompt position would cost more than the body's forward itself.
    """
    hidden = model.hidden(batch["input_ids"], batch["attention_mask"])
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = model.arch.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep], reduction=reduction)


@parallel.inference
def validation_loss(model: nn.Module, data: Pairs, batch_size: int, pad_id: int, precision: str = "fp32") -> float:
    """Mean teacher-forced loss per target token: a single LoRA adapter merged meanwhile, under
    bf16 autocast with the weights cast once (after the merge)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches, real = parallel.my_batches(eval_batches(data.lengths, batch_size))
    with inference_weights(model, precision, model.arch.lm_head):
        for j, idx in enumerate(batches):  # under torchrun each process takes its share
            with autocast(precision):
                loss = lm_loss(model, collate_pairs(data, idx, pad_id), reduction="sum").item()
            if j < real:
                total, count = total + loss, count + data.target_tokens(idx)
    model.train(was_training)
    total, count = parallel.all_sum(total, count)
    return total / max(1, count)


def complete(model: nn.Module, tokenizer, prompts: Pairs, *, max_new_tokens: int, batch_size: int = 8,
             sampling: Sampling | None = None, stop_strings: tuple[str, ...] = ("\n",), seed: int = 0,
             progress: bool = False, desc: str = "generating", precision: str = "fp32") -> list[str]:
    """Decode every prompt (batched, longest first, left-padded); texts in the original order."""
    was_training = model.training
    model.eval()
    out: dict[int, str] = {}
    pad = tokenizer.pad_token_id
    # under torchrun each process decodes its share; a batch's seed is its number, whoever decodes it
    batches, real = parallel.my_batches(list(enumerate(batch_indices(prompts.lengths, batch_size, shuffle=False))))
    progress = progress and parallel.is_main()
    with parallel.gathered(model):
        for j, (n, idx) in enumerate(tqdm(batches, desc=desc, leave=False, disable=None if progress else True)):
            ids, mask = pad_rows([torch.as_tensor(prompts.input_ids[i], dtype=torch.long) for i in idx], "left", pad)
            new = generate(model, ids, mask, max_new_tokens, sampling, stop_ids=(tokenizer.eos_token_id,),
                           pad_id=pad, seed=seed + n, stop_strings=stop_strings, tokenizer=tokenizer,
                           precision=precision)
            if j < real:
                out.update({int(i): trim_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop_strings).strip()
                            for i, row in zip(idx, new.tolist())})
    model.train(was_training)
    for part in parallel.gather_objects(out):
        out.update(part)
    return [out[i] for i in range(len(prompts))]


def evaluate_generation(model: nn.Module, tokenizer, data: Pairs, *, max_new_tokens: int, batch_size: int = 8,
                        sampling: Sampling | None = None, seed: int = 0, progress: bool = False,
                        with_loss: bool = True, precision: str = "fp32") -> tuple[dict[str, float], float, list[str]]:
    """Task metrics of greedy (or sampled) outputs, the teacher-forced loss, and the outputs."""
    loss = validation_loss(model, data, batch_size, tokenizer.pad_token_id, precision) if with_loss else float("nan")
    preds = complete(model, tokenizer, data.prompts(), max_new_tokens=max_new_tokens, batch_size=batch_size,
                     sampling=sampling, seed=seed, progress=progress, precision=precision)
    return generation_metrics(preds, data.targets), loss, preds
