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

SPLITS = ("train", "validation", "test")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


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
        folder = next((r / task for r in data_roots() if (r / task / "train.jsonl").is_file()), None)
        raw = _read_folder(folder) if folder else _read_hub(spec)
    elif path.is_dir():
        raw = _read_folder(path)
    elif path.suffix in FORMATS:
        if not path.is_file():
            raise PeftlabError(f"data file '{task}' does not exist")
        raw = _split_one(_read_file(path, "train"), seed)
    else:
        raise unknown("task", task, list(TASKS), "or give a .jsonl/.csv/.tsv/.parquet file or a folder")
    text_column = text_column or (spec.text_column if spec else "text")
    label_column = label_column or (spec.label_column if spec else "label")
    splits = {s: _columns(raw[s], s, text_column, label_column) for s in SPLITS}
    labels = spec.labels if spec else _label_names(splits)
    splits = {s: _label_ids(ds, s, labels, bool(spec)) for s, ds in splits.items()}
    name = spec.name if spec else path.stem
    return Task(name=name, labels=labels, metric=spec.metric if spec else "accuracy", splits=splits,
                template=spec.template if spec else "{text}", words=(spec and spec.words) or labels)


def _read_file(path: Path, split: str) -> Dataset:
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise PeftlabError(f"'{path}': unsupported format; use one of {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        raise PeftlabError(f"'{path}' is empty; give a file with at least one row")
    kw = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        ds = load_dataset(kind, data_files={split: str(path)}, split=split, **kw)
    except Exception as e:  # datasets raises many types for malformed files
        raise PeftlabError(f"cannot read '{path}' as {path.suffix}: {str(e).splitlines()[0]}") from e
    if len(ds) == 0:
        raise PeftlabError(f"'{path}' has no rows; give a file with at least one row")
    return ds


def _read_folder(folder: Path) -> dict[str, Dataset]:
    out = {}
    for split in SPLITS:
        found = [folder / f"{split}{ext}" for ext in FORMATS if (folder / f"{split}{ext}").is_file()]
        if not found:
            raise PeftlabError(f"'{folder}' has no {split} file; expected {split}.jsonl (or .csv/.tsv/.parquet)")
        out[split] = _read_file(found[0], split)
    return out


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


def _split_one(ds: Dataset, seed: int) -> dict[str, Dataset]:
    if len(ds) < 10:
        raise PeftlabError(f"a single data file needs at least 10 rows to split 80/10/10, it has {len(ds)}")
    order = np.random.default_rng(seed).permutation(len(ds))
    a, b = int(0.8 * len(ds)), int(0.9 * len(ds))
    return {"train": ds.select(order[:a]), "validation": ds.select(order[a:b]), "test": ds.select(order[b:])}


def _columns(ds: Dataset, split: str, text_column: str, label_column: str) -> Dataset:
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in ds.column_names:
            raise PeftlabError(f"{split} data has no column '{col}' (columns: {', '.join(ds.column_names)}); "
                               f"name the right one with {flag}")
    ds = ds.select_columns([text_column, label_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if label_column != "label":
        ds = ds.rename_column(label_column, "label")
    for i, t in enumerate(ds["text"]):
        if not isinstance(t, str):
            raise PeftlabError(f"{split} row {i}: text is {type(t).__name__}, not a string; fix or drop the row")
    return ds


def _label_names(splits: dict[str, Dataset]) -> tuple[str, ...]:
    train = set(splits["train"]["label"])
    if None in train:
        raise PeftlabError("train data has rows with no label; fill or drop them")
    return tuple(str(x) for x in sorted(train, key=lambda x: (str(type(x)), x)))


def _label_ids(ds: Dataset, split: str, labels: tuple[str, ...], builtin: bool) -> Dataset:
    values = ds["label"]
    n = len(labels)
    if builtin:  # built-in tasks store integer ids
        bad = [(i, v) for i, v in enumerate(values) if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n]
        if bad:
            i, v = bad[0]
            raise PeftlabError(f"{split} row {i}: label {v!r} is out of range; labels are ints 0..{n - 1} "
                               f"({', '.join(labels)})")
        return ds
    index = {name: i for i, name in enumerate(labels)}
    unseen = sorted({str(v) for v in values} - set(index))
    if unseen:
        raise PeftlabError(f"{split} labels {unseen[:5]} never occur in train (train labels: "
                           f"{', '.join(labels)}); every split must share one label set")
    return ds.map(lambda r: {"label": index[str(r["label"])]}, desc=None)


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
