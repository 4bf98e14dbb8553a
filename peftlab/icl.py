"""In-context learning (ICL): the no-training baseline, for classification and generation.

A frozen causal LM reads k labelled examples from the training split, then the query, and each
label is scored by the log-probability the LM gives its word next (the label-word head of
heads.py; Brown et al. 2020, "Language Models are Few-Shot Learners"). For sst2, k = 2:

    Review: a gorgeous , witty film\\nSentiment: positive     <- support 1: template + " " + word
                                                            <- blocks joined by a blank line
    Review: flat and lifeless\\nSentiment: negative          <- support 2
                                                            <-
    Review: <query>\\nSentiment:                             <- the query, scored by label words

One draw of k support examples (a seeded permutation of the training split, so also their
order) serves every query of a repeat; repeats use seeds seed, seed+1, ... and their spread
shows how much the result hangs on which examples were drawn and in what order (Zhao et al.
2021, "Calibrate Before Use"). k = 0 is zero-shot and needs one repeat only.

Generation tasks (xsum, babi) build prompts the same way with the target after each support
example, decode the query's continuation with peftlab's loop (greedy, stop at a newline) and
score ROUGE / exact match; k = 0 on xsum is the hard-prompt baseline ("Summarize the article
in one sentence. ... Summary:") that fine-tuned methods are compared with.
"""

import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from peftlab.batching import Encoded, check_template, encode, fill
from peftlab.checkpoint import save_json
from peftlab.data import Task, load_task, subset
from peftlab.errors import PeftlabError
from peftlab.generation import GenTask, complete, encode_pairs, is_generation, load_gen_task
from peftlab.heads import Classifier, LanguageModel
from peftlab.icl_report import plot_curve, print_table, write_table
from peftlab.metrics import GENERATION_METRICS, METRICS, classification_metrics, generation_metrics
from peftlab.models import Backbone, load_backbone
from peftlab.speed import resolve
from peftlab.train import logits_fn, predict

SEP = "\n\n"  # between support examples, and before the query
JSON, TABLE, CURVE = "icl.json", "icl.md", "icl_curve.png"


@dataclass
class Draw:
    """One (k, support draw) cell: its metrics, its prompts, the support examples cut to fit, its time."""

    metrics: dict[str, float]
    prompts: Encoded
    dropped: int
    seconds: float


def parse_shots(text: str) -> list[int]:
    """'0,1,4' -> [0, 1, 4] (the --shots flag)."""
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        msg = f"--shots '{text}' must be comma-separated whole numbers, e.g. 0,1,4,8,16"
        raise PeftlabError(msg) from None
    if not shots:
        raise PeftlabError("--shots is empty; give the numbers of examples per prompt, e.g. 0,1,4,8,16")
    return shots


def draw(n: int, k: int, seed: int) -> np.ndarray:
    """k support rows of n: the first k of a seeded permutation (a smaller k takes a prefix)."""
    return np.random.RandomState(seed).permutation(n)[:k]


def support_blocks(task: Task, train_ds: Dataset, k: int, seed: int) -> list[str]:
    """k training examples, each framed by the task's template and followed by its label word.

    The draw is the first k of a seeded permutation: the same seed gives the same examples in
    the same order, and a smaller k takes a prefix of a larger k's draw.
    """
    _check_k(k, len(train_ds))
    if seed < 0:
        raise PeftlabError(f"--seed must be >= 0, got {seed}")
    rows = [train_ds[int(i)] for i in draw(len(train_ds), k, seed)]
    # one leading space, as LabelWords scores " " + word after the prompt
    return [fill(task.template, r["text"]) + " " + task.words[r["label"]].strip() for r in rows]


def build_prompt(task: Task, train_ds: Dataset, query_text: str, k: int, seed: int) -> str:
    """The k-shot prompt for one query: k support examples from `train_ds`, then the query unanswered."""
    check_template(task.template)
    return SEP.join([*support_blocks(task, train_ds, k, seed), fill(task.template, query_text)])


def encode_prompts(task: Task, tokenizer: PreTrainedTokenizerBase, blocks: list[str], queries: list[str],
                   labels, max_length: int) -> tuple[Encoded, int]:
    """Token ids of each query's prompt (`blocks` then the query), at most max_length long.

    A prompt that is too long loses support examples from the front (the oldest) until it fits;
    only when the query alone is too long is its text shortened, its frame kept whole (as
    batching.encode does). Returns the prompts, with `truncated` counting the shortened ones,
    and the number of support examples dropped in all.
    """
    def tokens(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]

    tails = [fill(task.template, q) for q in queries]
    ids = tokens([SEP.join([*blocks, t]) for t in tails])
    long = [i for i, x in enumerate(ids) if len(x) > max_length]
    dropped, alone_too_long = 0, []
    for i in long:  # re-tokenize whole prompts: tokens may merge across a block boundary
        j = 0
        while len(ids[i]) > max_length and j < len(blocks):
            j += 1
            ids[i] = tokens([SEP.join([*blocks[j:], tails[i]])])[0]
        dropped += j
        if len(ids[i]) > max_length:
            alone_too_long.append(i)
    if alone_too_long:
        short = encode([queries[i] for i in alone_too_long], [0] * len(alone_too_long), tokenizer, max_length,
                       "query", task.template)
        for i, x in zip(alone_too_long, short.input_ids, strict=True):
            ids[i] = x
    # an empty text under the bare "{text}" template still needs one position to score after
    filler = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id]
    ids = [x or filler for x in ids]
    return Encoded(ids, np.asarray(labels, dtype=np.int64), truncated=len(long)), dropped


def score_prompts(model: Classifier, tokenizer: PreTrainedTokenizerBase, enc: Encoded,
                  batch_size: int, precision: str = "fp32") -> np.ndarray:
    """(N, num_labels) label-word log-probabilities, in the order of `enc`.

    Batches come from prompts of similar length (sorted), left-padded: every prompt then ends
    at the last position, where the label words are scored.
    """
    logits, _ = predict(model, enc, logits_fn(model, enc, tokenizer.pad_token_id, "left"), batch_size,
                        precision=precision)
    return logits


def icl_classify(backbone: Backbone, task: Task, shots: list[int], repeats: int = 3, limit: int | None = None,
                 seed: int = 0, batch_size: int = 16, max_length: int = 1024,
                 progress: bool = True, precision: str = "auto") -> list[dict]:
    """k-shot in-context classification of the test split, for each k in `shots`.

    Args:
        backbone: a causal LM with an LM head (from `load_backbone`); nothing is trained.
        task: a loaded task; its template frames every example, its words are the answers.
        shots: numbers of support examples per prompt (in total, not per class); 0 = zero-shot.
        repeats: support draws per k (seeds seed, seed+1, ...); k = 0 runs once.
        limit: score a seeded, stratified subset of this many test rows.
        seed: the first draw's seed; also seeds the test subset.
        batch_size: prompts per forward pass.
        max_length: token budget of one prompt (capped at the model's context); longer prompts
            drop support examples from their front.
        progress: show a progress bar over the (k, repeat) cells.
        precision: 'auto' (bf16 autocast where the CPU has bf16 instructions; the label words'
            log-probabilities still come from an fp32 LM head), 'bf16' or 'fp32' (the reference).

    Returns:
        One record per k (ascending): k, metric (the task's), mean, std and values of it over
        the draws, the same for every metric under `metrics`, seeds, rows, prompt_tokens
        (mean per prompt), shortened (prompts over budget), dropped (support examples cut),
        seconds, precision (as resolved).

    Raises:
        PeftlabError: a bad k, repeats, limit, seed, batch size or budget; a model without an LM head.
    """
    shots = _check_args(shots, repeats, limit, seed, batch_size, max_length, precision)
    _check_inputs(backbone, task, shots)
    train_ds = task.splits["train"]
    tok = backbone.tokenizer
    model = Classifier(backbone.arch, task.num_labels, tokenizer=tok, label_words=task.words).eval()
    budget = _budget(backbone, model, max_length)
    fix = ("use fewer shots: the model's context caps prompts" if budget < max_length
           else "raise --max-length to keep them")
    test = subset(task.splits["test"], limit, seed)
    queries, labels = list(test["text"]), np.asarray(test["label"])
    cells = [(k, r) for k in shots for r in range(1 if k == 0 else repeats)]
    draws: dict[int, list[Draw]] = {k: [] for k in shots}
    bar = tqdm(cells, desc=f"icl {task.name}", unit="draw", disable=None if progress else True,
               dynamic_ncols=True)
    for k, r in bar:
        bar.set_postfix(k=k, draw=r + 1)
        t0 = time.perf_counter()
        blocks = support_blocks(task, train_ds, k, seed + r)
        enc, dropped = encode_prompts(task, tok, blocks, queries, labels, budget)
        if k and dropped == k * len(queries):
            raise PeftlabError(f"k={k}: no support example fits beside a query in {budget} tokens, so every prompt "
                               f"would be 0-shot; {fix}")
        preds = score_prompts(model, tok, enc, batch_size, precision).argmax(-1)
        draws[k].append(Draw(classification_metrics(preds, labels), enc, dropped, time.perf_counter() - t0))
    records = [_record(backbone.name, task, k, seed, draws[k], precision=precision) for k in shots]
    for rec in records:
        n = rec["rows"] * len(rec["seeds"])
        if rec["dropped"]:
            warnings.warn(f"k={rec['k']}: {rec['shortened']} of {n} prompts were over {budget} tokens and "
                          f"lost {rec['dropped']} support examples from their front to fit; {fix}", stacklevel=2)
        elif rec["shortened"]:
            warnings.warn(f"k={rec['k']}: {rec['shortened']} of {n} queries were over {budget} tokens alone and were "
                          "shortened (their frame kept whole)", stacklevel=2)
    return records


def icl_generate(backbone: Backbone, task: GenTask, shots: list[int], repeats: int = 3, limit: int | None = None,
                 seed: int = 0, batch_size: int = 8, max_length: int = 1024, progress: bool = True,
                 precision: str = "auto") -> list[dict]:
    """k-shot in-context generation on the test split, for each k in `shots` (see `icl_classify`).

    Prompts longer than max_length shorten the query's input (as training does: xsum keeps
    the article's start, bAbI the story's end); outputs are decoded greedily and cut at a newline.
    """
    shots = _check_args(shots, repeats, limit, seed, batch_size, max_length, precision)
    train_ds, tok = task.splits["train"], backbone.tokenizer
    for k in shots:
        _check_k(k, len(train_ds))
    model = LanguageModel(backbone.arch, tok).eval()
    test = subset(task.splits["test"], limit, seed)
    queries, targets = list(test["text"]), list(test["target"])
    cells = [(k, r) for k in shots for r in range(1 if k == 0 else repeats)]
    draws: dict[int, list[Draw]] = {k: [] for k in shots}
    for k, r in tqdm(cells, desc=f"icl {task.name}", unit="draw", disable=None if progress else True):
        t0 = time.perf_counter()
        order = draw(len(train_ds), k, seed + r)
        support = "".join(fill(task.template, train_ds[int(i)]["text"]) + " " + train_ds[int(i)]["target"] + SEP
                          for i in order)
        # the support joins the template: an over-long prompt shortens the query's input, never the frame
        prompts = encode_pairs(queries, targets, tok, support + task.template, max_length, keep_end=task.keep_end,
                               with_targets=False)
        preds = complete(model, tok, prompts, max_new_tokens=task.max_new_tokens, batch_size=batch_size, seed=seed,
                         precision=precision)
        draws[k].append(Draw(generation_metrics(preds, targets), prompts, prompts.truncated, time.perf_counter() - t0))
    return [_record(backbone.name, task, k, seed, draws[k], GENERATION_METRICS, precision) for k in shots]


def _check_args(shots, repeats, limit, seed, batch_size, max_length, precision) -> list[int]:
    resolve(precision)  # an unknown precision fails with the other arguments, before anything loads
    checks = [
        (len(shots) > 0, "give at least one k in --shots, e.g. 0,1,4,8,16"),
        (repeats >= 1, f"--repeats must be at least 1, got {repeats}"),
        (limit is None or limit >= 1, f"--limit must be at least 1, got {limit}"),
        (seed >= 0, f"--seed must be >= 0, got {seed}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
        (max_length >= 2, f"--max-length must be at least 2, got {max_length}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise PeftlabError(msg)
    for k in shots:
        _check_k(k, None)
    return sorted(set(shots))


def _check_inputs(backbone: Backbone, task: Task, shots: list[int]) -> None:
    if not backbone.arch.causal or backbone.arch.lm_head is None:
        raise PeftlabError(f"in-context learning needs a causal LM with an LM head; '{backbone.name}' "
                           f"({backbone.arch.model_type}) has none: pick one such as smollm2-135m")
    for k in shots:
        _check_k(k, len(task.splits["train"]))
    check_template(task.template)


def _check_k(k: int, n_train: int | None) -> None:
    if k < 0:
        raise PeftlabError(f"k={k}: the number of support examples must be >= 0 (0 = zero-shot)")
    if n_train is not None and k > n_train:
        raise PeftlabError(f"k={k} is larger than the train split ({n_train} rows); "
                           f"give a k of at most {n_train}")


def _budget(backbone: Backbone, model: Classifier, max_length: int) -> int:
    """max_length, capped so the prompt plus its label word's tokens fit the model's positions."""
    context = getattr(backbone.model.config, "max_position_embeddings", None)
    if context is None:
        return max_length
    return min(max_length, context - model.head.word_ids.shape[1])


def _record(model: str, task: Task | GenTask, k: int, seed: int, draws: list[Draw],
            names: tuple[str, ...] = METRICS, precision: str = "fp32") -> dict:
    """The summary of one k over its draws: mean, std (n-1; 0 for one draw) and values of each metric."""
    def stats(values: list[float]) -> dict:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return {"mean": float(np.mean(values)), "std": std, "values": values}

    metrics = {m: stats([d.metrics[m] for d in draws]) for m in names}
    main = metrics[task.metric]
    return {
        "model": model, "task": task.name, "k": k, "metric": task.metric,
        "percent": names is not METRICS,  # generation metrics are x100 already
        "mean": main["mean"], "std": main["std"], "values": main["values"], "metrics": metrics,
        "seeds": [seed + i for i in range(len(draws))], "rows": len(draws[0].prompts),
        "prompt_tokens": float(np.mean([d.prompts.lengths.mean() for d in draws])),
        "shortened": sum(d.prompts.truncated for d in draws), "dropped": sum(d.dropped for d in draws),
        "seconds": sum(d.seconds for d in draws), "precision": resolve(precision),
    }


# --- one call for the CLI ---------------------------------------------------------------------------

def run_icl(model: str, task: str, shots: list[int], repeats: int = 3, limit: int | None = None,
            seed: int = 0, out_dir: str | Path | None = None, batch_size: int = 16, max_length: int = 1024,
            progress: bool = True, show: bool = True, precision: str = "auto") -> list[dict]:
    """Load a model and a task, run `icl_classify`, write icl.json, icl.md and icl_curve.png, print the table.

    out_dir defaults to runs/icl-<model>-<task>-<time>. Returns the records.
    """
    _check_args(shots, repeats, limit, seed, batch_size, max_length, precision)  # fail before any loading
    generative = is_generation(task)
    loaded = load_gen_task(task, seed=seed) if generative else load_task(task, seed=seed)
    backbone = load_backbone(model, seed=seed)
    if not generative:
        _check_inputs(backbone, loaded, shots)  # before an output folder is made
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir or f"runs/icl-{Path(model).stem}-{Path(task).stem}-{stamp}")
    try:  # before the long part
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PeftlabError(f"cannot write to '{out}' ({e.strerror}); give another --out") from e
    run = icl_generate if generative else icl_classify
    records = run(backbone, loaded, shots, repeats, limit, seed, batch_size, max_length, progress, precision)
    save_json(out / JSON, records)
    write_table(records, out / TABLE)
    plot_curve(records, out / CURVE)
    if show:  # a lab cell reports through the experiment's table instead
        print_table(records)
        print(f"results: {out / TABLE}, {out / CURVE}, {out / JSON}")
    return records
