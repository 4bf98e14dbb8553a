"""Classification tasks: built-in task specs, loading splits from disk (or the hub), subsets.

A task is found, in this order: a built-in name resolved under PEFTLAB_DATA, then under
`../shared/data` beside the repository, then on the Hugging Face hub (when online); or a local
.jsonl/.csv/.tsv/.parquet file, or a directory holding train/validation/test files.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

from peftlab.errors import PeftlabError, unknown
from peftlab.files import FORMATS, SPLITS, is_missing, json_kind, missing_column, read_file, read_folder, short, \
    split_one, value_kind



@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]
    metric: str  # the validation metric that picks the best checkpoint
    text_column: str = "text"
    label_column: str = "label"
    hub: tuple[str, str | None, str] | None = None  # (path, config, its text column) when online
    template: str = "{text}"  # how a text is framed for label-word scoring and in-context learning
    words: tuple[str, ...] | None = None  # label words (verbalizers); default: the label names


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("negative", "positive"), "accuracy", hub=("stanfordnlp/sst2", None, "sentence"),
                     template="Review: {text}\nSentiment:"),
    "cola": TaskSpec("cola", ("unacceptable", "acceptable"), "mcc", hub=("nyu-mll/glue", "cola", "sentence"),
                     template="Sentence: {text}\nIs this sentence grammatically correct or incorrect? Answer:",
                     words=("incorrect", "correct")),
    # 13% spam: macro-F1 picks checkpoints that find spam, not ones that say "ham" to everything.
    "sms_spam": TaskSpec("sms_spam", ("ham", "spam"), "macro_f1", hub=("ucirvine/sms_spam", None, "sms"),
                         template="Message: {text}\nIs this message spam or ham? Answer:"),
    "amazon_reviews": TaskSpec("amazon_reviews", ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"),
                               "accuracy", hub=("mteb/amazon_reviews_multi", "en", "text"),
                               template="Review: {text}\nRating (1 to 5 stars):", words=("1", "2", "3", "4", "5")),
}


@dataclass
class Task:
    """A loaded classification task: label names, metric and the three splits (text, label ids)."""

    name: str
    labels: tuple[str, ...]
    metric: str
    splits: dict[str, Dataset] = field(repr=False)
    template: str = "{text}"
    words: tuple[str, ...] = ()  # label words, one per label

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def data_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("PEFTLAB_DATA", "").split(os.pathsep) if p]
    repo = Path(__file__).resolve().parents[1]
    return roots + [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def task_folder(name: str) -> Path | None:
    """The built-in task's folder under the first data root that has one. A folder with a missing
    or misnamed split is read (and refused by name), not passed over for a later root's copy."""
    return next((r / name for r in data_roots() if (r / name).is_dir()), None)


def load_task(task: str, *, text_column: str | None = None, label_column: str | None = None,
              seed: int = 0) -> Task:
    """Load a built-in task by name, or a local file/directory with the given columns.

    Args:
        task: a name in `TASKS`, a data file, or a directory with train/validation/test files.
        text_column / label_column: the columns to read (default `text` / `label`).
        seed: seeds the 80/10/10 split of a single local file.

    Raises:
        PeftlabError: unknown task, missing file or column, bad labels, empty data.
    """
    spec = TASKS.get(task)
    path = Path(task)
    if spec is not None:
        folder = task_folder(task)
        raw = read_folder(folder) if folder else _read_hub(spec)
    elif path.is_dir():
        raw = read_folder(path)
    elif path.is_file() or path.suffix in FORMATS:
        if not path.is_file():
            raise PeftlabError(f"data file '{path}' does not exist; check the path (or give a built-in task, "
                               f"e.g. {', '.join(TASKS)})")
        raw = split_one(read_file(path), seed)
    else:
        from peftlab.generation import GEN_TASKS  # here: generation imports this module

        raise unknown("task", task, [*TASKS, *GEN_TASKS], "or give a .jsonl/.csv/.tsv/.parquet file or a folder")
    text_column = text_column or (spec.text_column if spec else "text")
    label_column = label_column or (spec.label_column if spec else "label")
    if text_column == label_column:
        raise PeftlabError(f"--text-column and --label-column are both '{text_column}'; name two columns")
    texts = {s: _texts(raw[s], s, text_column, label_column) for s in SPLITS}
    if spec:
        labels = spec.labels
        ids = {s: _builtin_labels(raw[s][label_column], s, spec) for s in SPLITS}
    else:
        values = {s: _label_values(raw[s][label_column], s) for s in SPLITS}
        labels = _label_names(values)
        ids = {s: _label_ids(values[s], s, labels) for s in SPLITS}
    splits = {s: Dataset.from_dict({"text": texts[s], "label": ids[s]}) for s in SPLITS}
    name = spec.name if spec else path.stem
    return Task(name=name, labels=labels, metric=spec.metric if spec else "accuracy", splits=splits,
                template=spec.template if spec else "{text}", words=(spec and spec.words) or labels)


def _read_hub(spec: TaskSpec) -> dict[str, Dataset]:
    path, config, text = spec.hub
    try:
        dd = load_dataset(path, config)
    except Exception as e:
        raise PeftlabError(
            f"task '{spec.name}' was not found under {', '.join(map(str, data_roots()))} and the hub "
            f"copy '{path}' could not be loaded ({type(e).__name__}); set PEFTLAB_DATA to a folder "
            f"holding {spec.name}/train.jsonl"
        ) from e
    dd = dd.rename_column(text, "text") if text != "text" else dd
    if "validation" not in dd or "test" not in dd or -1 in dd["test"]["label"]:
        # GLUE-style hubs hide test labels: use validation as test and carve validation from train.
        parts = dd["train"].train_test_split(test_size=0.1, seed=0)
        dd = DatasetDict(train=parts["train"], validation=parts["test"], test=dd.get("validation", dd["train"]))
    return dict(dd)


# -- columns and labels ----------------------------------------------------------------------

def _texts(ds: Dataset, split: str, text_column: str, label_column: str) -> list[str]:
    """The split's texts, once both columns are known to be there."""
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in ds.column_names and col == label_column and split != "train":  # train had it: read first
            raise PeftlabError(f"{split} data has no column '{col}' (columns: {', '.join(ds.column_names)}) though "
                               f"train has it; peftlab scores every split against its labels: add them to {split}")
        if col not in ds.column_names:
            raise missing_column(split, col, ds.column_names, flag)
    texts = ds[text_column]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PeftlabError(f"{split} row {i}: text is {value_kind(t)}, not a string; fix or drop the row")
    return texts


def _builtin_labels(values: list, split: str, spec: TaskSpec) -> list[int]:
    """Built-in tasks store integer label ids."""
    n = len(spec.labels)
    for i, v in enumerate(values):
        if is_missing(v):
            raise PeftlabError(f"{split} row {i} has no label; fill it in or drop the row")
        if not isinstance(v, int) or isinstance(v, bool):
            raise PeftlabError(f"{split} row {i}: label {short(v)} is a {json_kind(v)}; {spec.name} stores labels as "
                               f"ints 0..{n - 1} ({', '.join(spec.labels)})")
        if not 0 <= v < n:
            raise PeftlabError(f"{split} row {i}: label {v!r} is out of range; labels are ints 0..{n - 1} "
                               f"({', '.join(spec.labels)})")
    return values


def _label_values(values: list, split: str) -> list:
    """A local split's labels as strings or ints (whole floats, as CSV readers make them, become ints)."""
    out = []
    for i, v in enumerate(values):
        if is_missing(v):
            raise PeftlabError(f"{split} row {i} has no label; fill it in or drop the row")
        if isinstance(v, float):
            if not v.is_integer():
                raise PeftlabError(f"{split} row {i}: label {v!r} is not a whole number; classification labels are "
                                   "names or integers (for a score, bin it into classes first)")
            v = int(v)
        if not isinstance(v, (str, int)):
            raise PeftlabError(f"{split} row {i}: label {short(v)} is a {json_kind(v)}; a label is one name or "
                               "integer per row")
        out.append(v)
    return out


def _label_names(values: dict[str, list]) -> tuple[str, ...]:
    train = set(values["train"])
    names = tuple(str(x) for x in sorted(train, key=lambda x: (str(type(x)), x)))
    folded: dict[str, str] = {}
    for name in names:
        twin = folded.setdefault(name.strip().lower(), name)
        if twin != name:
            raise PeftlabError(f"train labels {twin!r} and {name!r} differ only in case or spaces, so they would be "
                               "two classes; make them one label in the data")
    if len(names) < 2:
        raise PeftlabError(f"the train data has a single label ({', '.join(names)}); a classifier needs at least "
                           "two: check --label-column, or add rows of the other labels")
    return names


def _label_ids(values: list, split: str, labels: tuple[str, ...]) -> list[int]:
    index = {name: i for i, name in enumerate(labels)}
    unseen = sorted({str(v) for v in values} - set(index))
    if unseen:
        raise PeftlabError(f"{split} labels {unseen[:5]} never occur in train (train labels: "
                           f"{', '.join(labels)}); every split must share one label set: fix those rows or "
                           "add examples of them to train")
    return [index[str(v)] for v in values]


def subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A fixed, seeded subset of n rows, stratified by label when there is one (each label keeps its share)."""
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise PeftlabError(f"a row limit must be positive, got {n}")
    rng = np.random.default_rng(seed)
    if "label" not in ds.column_names:
        return ds.select(np.sort(rng.permutation(len(ds))[:n]))
    labels = np.asarray(ds["label"])
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / len(ds) * n).astype(int)
    # hand the rounding remainder to the classes with the largest fractional parts
    rest = n - quota.sum()
    quota[np.argsort(-(counts / len(ds) * n - quota))[:rest]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return ds.select(np.sort(np.concatenate(picked)))


def per_class(ds: Dataset, k: int, seed: int) -> Dataset:
    """A seeded few-shot subset: k rows of each label (all of a label's rows when it has fewer)."""
    if k < 1:
        raise PeftlabError(f"--train-per-class must be at least 1, got {k}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(ds["label"])
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return ds.select(np.sort(np.concatenate(picked)))
