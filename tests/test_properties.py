"""Property-based tests: no input makes the data loaders or the config parsers fail with anything
but PeftlabError, whose message is one line. Inputs: random bytes and text as data files, folder
tasks of random rows (random columns; JSON values of every type, huge and empty strings,
unicode), random config dicts, and random bytes or YAML as config and experiment files."""

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab.errors import PeftlabError

SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])

SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".parquet"]
COLUMNS = ["text", "label", "id", "idx", "question", "answer", "sentence", "", "Text", "label "]
SPECIAL = ["", " ", "x" * 100_000, "\u2028", "\x00", "caf\u00e9", "\U0001f600", "{text}", "nan", "1", "\n"]

leaves = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats()
          | st.text(max_size=20) | st.sampled_from(SPECIAL))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
column_names = st.sampled_from(COLUMNS) | st.text(max_size=6)
random_rows = st.dictionaries(column_names, json_values, max_size=4)
# rows that look like a task, so that loading often gets past the columns to the values
task_rows = st.fixed_dictionaries({"text": json_values, "label": json_values},
                                  optional={"id": json_values, "answer": json_values})
labelled_rows = st.fixed_dictionaries({"text": st.text(max_size=8), "label": st.sampled_from(["a", "b", 1, 2.0])})
rows_strategy = st.lists(random_rows | task_rows | labelled_rows, max_size=14)


@st.composite
def near_valid_split(draw) -> list[dict]:
    """A valid split (texts, labels a/b) with at most one row made of random values: loading gets
    past reading and columns, to the values and labels."""
    rows = [{"text": draw(st.text(max_size=12) | st.sampled_from(SPECIAL)), "label": label}
            for label in draw(st.lists(st.sampled_from(["a", "b"]), min_size=2, max_size=8))]
    if draw(st.booleans()):
        bad = draw(task_rows | random_rows)
        rows.insert(draw(st.integers(0, len(rows))), bad)
    return rows


splits_strategy = st.tuples(rows_strategy, rows_strategy, rows_strategy) | st.tuples(*[near_valid_split()] * 3)


@pytest.fixture
def scratch(tmp_path_factory):
    """A fresh folder per example (hypothesis calls the test many times with one fixture value)."""
    base = tmp_path_factory.mktemp("props")

    def fresh() -> Path:
        return Path(tempfile.mkdtemp(dir=base))
    yield fresh
    shutil.rmtree(base, ignore_errors=True)


def succeeds_or_refuses(fn: Callable, *args, **kwargs) -> None:
    """Call fn: it may return or raise PeftlabError with a one-line message; nothing else."""
    try:
        fn(*args, **kwargs)
    except PeftlabError as e:
        assert "\n" not in str(e) and str(e).strip()


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rows as the file's format: JSON lines, a JSON list, CSV/TSV (via pandas) or parquet."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        df = pd.DataFrame(rows) if rows else pd.DataFrame({"text": []})
        if path.suffix == ".parquet":
            try:
                df.to_parquet(path)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):  # rows arrow cannot store
                path.write_bytes(b"PAR1 broken")
        else:
            df.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)


# -- data loaders ----------------------------------------------------------------------------

@SETTINGS
@given(data=st.binary(max_size=400) | st.text(max_size=400).map(str.encode),
       suffix=st.sampled_from(SUFFIXES), columns=st.sampled_from([(None, None), ("sentence", "label"), ("id", "idx")]))
def test_any_bytes_as_a_data_file(scratch, data, suffix, columns):
    from peftlab.data import load_task

    path = scratch() / f"d{suffix}"
    path.write_bytes(data)
    succeeds_or_refuses(load_task, str(path), text_column=columns[0], label_column=columns[1])


@SETTINGS
@given(lines=st.lists(json_values.map(json.dumps) | st.text(max_size=30), max_size=14),
       suffix=st.sampled_from([".jsonl", ".json"]))
def test_json_lines_of_any_values(scratch, lines, suffix):
    from peftlab.data import load_task

    path = scratch() / f"d{suffix}"
    path.write_text("\n".join(lines))
    succeeds_or_refuses(load_task, str(path))


@SETTINGS
@given(splits=splits_strategy, formats=st.tuples(*[st.sampled_from(SUFFIXES)] * 3),
       text_column=st.none() | column_names, label_column=st.none() | column_names)
def test_folder_task_of_random_rows(scratch, splits, formats, text_column, label_column):
    from peftlab.data import load_task

    folder = scratch()
    for split, rows, suffix in zip(("train", "validation", "test"), splits, formats):
        write_rows(folder / f"{split}{suffix}", rows)
    succeeds_or_refuses(load_task, str(folder), text_column=text_column, label_column=label_column)


@SETTINGS
@given(rows=rows_strategy | near_valid_split(), suffix=st.sampled_from(SUFFIXES),
       columns=st.tuples(column_names, column_names) | st.just(("text", "label")))
def test_generation_file_of_random_rows(scratch, rows, suffix, columns):
    from peftlab.generation import load_gen_task

    path = scratch() / f"d{suffix}"
    write_rows(path, rows * 4)  # often enough rows to split
    succeeds_or_refuses(load_gen_task, str(path), input_column=columns[0], target_column=columns[1])


@SETTINGS
@given(rows=st.lists(task_rows | labelled_rows, min_size=1, max_size=12))
def test_builtin_task_with_random_rows(scratch, rows, monkeypatch):
    """A built-in name whose files (under PEFTLAB_DATA) hold anything."""
    from peftlab.data import load_task

    root = scratch()
    (root / "sst2").mkdir()
    for split in ("train", "validation", "test"):
        write_rows(root / "sst2" / f"{split}.jsonl", rows)
    monkeypatch.setenv("PEFTLAB_DATA", str(root))
    succeeds_or_refuses(load_task, "sst2")


# -- config parsers --------------------------------------------------------------------------

def _field_names(cls) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


def config_dicts() -> st.SearchStrategy[dict]:
    from peftlab.decode import Sampling
    from peftlab.methods import MethodArgs
    from peftlab.runconfig import RunConfig
    from peftlab.train import TrainArgs

    def nested(cls):
        return st.dictionaries(st.sampled_from(_field_names(cls)) | st.text(max_size=5), json_values, max_size=4)
    top = st.dictionaries(st.sampled_from([n for n in _field_names(RunConfig)
                                           if n not in ("train", "method_args", "decoding")]) | st.text(max_size=5),
                          json_values, max_size=5)
    extra = st.fixed_dictionaries({}, optional={"train": nested(TrainArgs) | json_values,
                                                "method_args": nested(MethodArgs) | json_values,
                                                "decoding": nested(Sampling) | json_values})
    return st.tuples(top, extra).map(lambda t: {**t[0], **t[1]})


@pytest.mark.filterwarnings("ignore:.*this peftlab does not know")  # random keys: expected, and noisy
@SETTINGS
@given(d=config_dicts())
def test_run_config_from_any_dict(d):
    from peftlab.runconfig import RunConfig

    succeeds_or_refuses(RunConfig.from_dict, d)


@SETTINGS
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_load_json_and_yaml_of_any_bytes(scratch, data):
    from peftlab.checkpoint import load_json, load_yaml

    path = scratch() / "config"
    path.write_bytes(data)
    succeeds_or_refuses(load_json, path)
    succeeds_or_refuses(load_yaml, path)


experiment_docs = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"name": json_values, "description": json_values,
                                        "defaults": st.dictionaries(column_names | st.sampled_from(
                                            ["model", "method", "lr", "lora_r", "epochs", "shots"]), json_values,
                                            max_size=3) | json_values,
                                        "grid": st.dictionaries(st.sampled_from(["method", "seed", "lr"])
                                                                | column_names, st.lists(json_values, max_size=3),
                                                                max_size=2) | json_values}),
)


@SETTINGS
@given(doc=experiment_docs | st.text(max_size=80))
def test_experiment_file_of_any_yaml(scratch, doc):
    from peftlab.lab import Experiment

    folder = scratch()
    path = folder / "exp.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    try:
        exp = Experiment.load(path)
        exp.cells(folder / "out")
    except PeftlabError as e:
        assert "\n" not in str(e)
