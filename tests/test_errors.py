"""The catalogue of bad inputs (docs/errors.md): each one makes the `peftlab` command exit with
code 2 and print one line, `peftlab: error: ...`, that names the problem and the fix; never a
traceback. Each case writes its bad input under tmp_path and gives the command line."""

import inspect
import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.errors import PeftlabError
from tests.conftest import toy_rows, write_jsonl

SIZES = {"train": 40, "validation": 10, "test": 10}


def rows(n: int, seed: int = 0) -> list[dict]:
    return toy_rows(n, random.Random(seed))


def folder(tmp: Path, name: str = "toy", **splits) -> str:
    """A train/validation/test folder of toy rows; a split given as rows, bytes or None (absent)
    replaces the toy one."""
    for split, n in SIZES.items():
        content = splits.get(split, rows(n, seed=len(split)))
        path = tmp / name / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            write_jsonl(path, content)
    return str(tmp / name)


def train(task: str, *extra: str, model: str = "tiny-gpt2", method: str = "head") -> list[str]:
    return ["train", "--model", model, "--task", task, "--method", method, "--epochs", "1", "--train-limit", "20",
            "--eval-limit", "10", "--cache-features", "off", *extra]


def gen_file(tmp: Path, target: list | None = None) -> str:
    """A single-file generation task with columns 'question' and 'answer'."""
    answers = target or [f"a{i}" for i in range(30)]
    return write_jsonl(tmp / "qa.jsonl", [{"question": f"q{i}", "answer": a} for i, a in enumerate(answers)])


def builtin(tmp: Path, monkeypatch, test_labels: list) -> str:
    """An sst2 folder under PEFTLAB_DATA whose test split has these labels."""
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp / "data"))
    good = [{"text": r["text"], "label": int(r["label"] == "fruit")} for r in rows(20)]
    folder(tmp / "data", "sst2", train=good, validation=good, test=[{"text": "t", "label": v} for v in test_labels])
    return "sst2"


def put(tmp: Path, name: str, content: str | bytes) -> str:
    """Write one file under tmp; its path."""
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


@dataclass
class Ctx:
    """What a case's setup gets: its folder, monkeypatch, and (lazily) a finished tiny run."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def run_copy(self) -> Path:
        """A copy of the module's finished run, free to break."""
        dst = self.tmp / "run"
        shutil.copytree(self.request.getfixturevalue("finished_run"), dst)
        return dst


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]  # writes the bad input, returns the command line
    fragments: tuple[str, ...]  # in the message: the problem and the fix


def _pickle_only_model(c: Ctx) -> list[str]:
    d = c.tmp / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not really a pickle")
    return train(folder(c.tmp), model=str(d))


def _remote_code_model(c: Ctx) -> list[str]:
    d = c.tmp / "custom"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "peftlab-custom-net",
                                               "auto_map": {"AutoConfig": "configuration.NetConfig",
                                                            "AutoModel": "modeling.Net"}}))
    (d / "modeling.py").write_text("raise SystemExit('this code must never run')\n")
    (d / "model.safetensors").write_bytes(b"{}")
    return train(folder(c.tmp), model=str(d))


def _corrupt_run(c: Ctx) -> list[str]:
    run = c.run_copy()
    with open(run / "trainable.safetensors", "r+b") as f:
        f.truncate(100)
    return ["eval", str(run)]


def _data_root_without_train(c: Ctx) -> str:
    """A PEFTLAB_DATA root whose sst2 folder lacks train.jsonl: refused, not passed over for ../shared's."""
    c.monkeypatch.setenv("PEFTLAB_DATA", str(c.tmp / "data"))
    folder(c.tmp / "data", "sst2", train=None)
    return "sst2"


def _model_dir(c: Ctx) -> str:
    d = c.tmp / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    return str(d)


def _unfinished_run(c: Ctx) -> str:
    run = c.run_copy()
    for name in ("trainable.safetensors", "metrics.json"):
        (run / name).unlink()
    return str(run)


def _index(c: Ctx) -> str:
    """An experiment index holding one run that varied lr."""
    from peftlab.lab import connect

    db = connect(c.tmp)
    db.execute("INSERT INTO runs (id, status, params) VALUES ('r', 'done', '{\"lr\": 0.001}')")
    db.commit()
    db.close()
    return str(c.tmp)


def _icl_cell(c: Ctx) -> str:
    run = c.run_copy()
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "method": "icl"}))
    (run / "trainable.safetensors").unlink()
    return str(run)


def _other_compare(c: Ctx) -> list[str]:
    """A compare folder whose head run was started with --lr 0.5; the command asks for the default."""
    from peftlab.runconfig import RunConfig
    from peftlab.train import TrainArgs

    task = folder(c.tmp)
    earlier = RunConfig(model="tiny-gpt2", task=task, method="head", train=TrainArgs(lr=0.5))
    (c.tmp / "cmp" / "head").mkdir(parents=True)
    (c.tmp / "cmp" / "head" / "config.json").write_text(json.dumps(asdict(earlier.portable())))
    return ["compare", "--model", "tiny-gpt2", "--task", task, "--methods", "head,lora", "--out", str(c.tmp / "cmp")]


def _corrupt_index(c: Ctx) -> str:
    (c.tmp / "index.sqlite").write_bytes(b"this is not a database" * 100)
    return str(c.tmp)


def _long_texts(n_tokens: int) -> dict:
    long = [{"text": "apple " * n_tokens, "label": "fruit"}, {"text": "table " * n_tokens, "label": "none"}]
    return {s: long * 5 + rows(10) for s in ("train", "validation", "test")}


CASES = [
    # -- files and formats
    Case("missing-data-file", lambda c: train(str(c.tmp / "nope.jsonl")),
         ("data file", "nope.jsonl' does not exist", "check the path")),
    Case("missing-split-file", lambda c: train(folder(c.tmp, test=None)),
         ("has no test file", "add test.jsonl")),
    Case("empty-file", lambda c: train(folder(c.tmp, train=b"")),
         ("train.jsonl' is empty", "at least one row")),
    Case("whitespace-only-file", lambda c: train(folder(c.tmp, validation=b"\n  \n\n")),
         ("validation.jsonl' is empty", "at least one row")),
    Case("unsupported-format", lambda c: train(put(c.tmp, "data.xlsx", b"PK\x03\x04")),
         ("unsupported format '.xlsx'", "save it as .jsonl")),
    Case("malformed-jsonl", lambda c: train(folder(c.tmp, train=b'{"text": "a", "label": "x"}\n'
                                                   b'{"text": "b", "label": "y"}\n{"text": broken\n')),
         ("line 3 of", "is not valid JSON", "fix or remove that line")),
    Case("jsonl-rows-not-objects", lambda c: train(folder(c.tmp, train=b'["apple pie", "fruit"]\n' * 20)),
         ("line 1 of", "is a JSON list, not an object", "one object per line")),
    Case("corrupt-parquet", lambda c: train(put(c.tmp, "d.parquet", b"not parquet at all")),
         ("cannot read", "as parquet", "re-export it")),
    Case("csv-ragged-rows", lambda c: train(put(c.tmp, "d.csv", "text,label\n" + "apple pie,fruit\n" * 5
                                                + "stone, river,none\n" + "table,none\n" * 10)),
         ("cannot read", "as .csv", "Expected 2 fields", "every row has the header's fields")),
    Case("tsv-with-commas", lambda c: train(put(c.tmp, "d.tsv", "text,label\n" + "apple pie,fruit\ntable,none\n" * 10)),
         ("no column 'text'", "header looks like one field", "--text-column")),
    Case("non-utf8-jsonl", lambda c: train(folder(c.tmp, train=b'{"text": "ok", "label": "a"}\n'
                                                  b'{"text": "caf\xe9", "label": "b"}\n')),
         ("train.jsonl' is not UTF-8 text", "byte 0xe9 on line 2", "re-encode it as UTF-8")),
    Case("non-utf8-csv", lambda c: train(put(c.tmp, "d.csv", "text,label\ncrème brûlée,fruit\n".encode("latin-1"))),
         ("d.csv' is not UTF-8 text", "line 2", "re-encode it as UTF-8")),
    Case("mixed-type-column", lambda c: train(folder(c.tmp, train=[{"text": "a", "label": 1},
                                                                   {"text": "b", "label": "two"}])),
         ("column 'label'", "mixes number and string values (rows 0 and 1)", "same type")),
    # -- columns
    Case("missing-text-column", lambda c: train(folder(c.tmp, train=[{"sentence": "a", "label": "x"}] * 5)),
         ("no column 'text'", "columns: sentence, label", "--text-column")),
    Case("misspelled-text-column", lambda c: train(folder(c.tmp), "--text-column", "txet"),
         ("no column 'txet'", "did you mean 'text'?", "--text-column")),
    Case("misspelled-label-column", lambda c: train(folder(c.tmp), "--label-column", "lable"),
         ("no column 'lable'", "did you mean 'label'?", "--label-column")),
    Case("misspelled-target-column", lambda c: train(gen_file(c.tmp), "--input-column", "question",
                                                     "--target-column", "answr", method="lora"),
         ("no column 'answr'", "did you mean 'answer'?", "--target-column")),
    Case("generation-without-input-column", lambda c: train(gen_file(c.tmp), "--target-column", "answer"),
         ("needs --input-column and --target-column", "e.g. --input-column question")),
    # -- values
    Case("null-text", lambda c: train(folder(c.tmp, train=rows(30) + [{"text": None, "label": "fruit"}])),
         ("train row 30: text is missing (null)", "fix or drop the row")),
    Case("non-string-text", lambda c: train(folder(c.tmp, train=[{"text": i, "label": "a"} for i in range(9)])),
         ("train row 0: text is a number (0)", "fix or drop the row")),
    Case("null-label", lambda c: train(folder(c.tmp, validation=rows(5) + [{"text": "x", "label": None}])),
         ("validation row 5 has no label", "fill it in or drop the row")),
    Case("label-of-wrong-type", lambda c: train(folder(c.tmp, train=[{"text": "x", "label": [i % 2]}
                                                                     for i in range(20)])),
         ("train row 0: label [0] is a list", "one name or integer per row")),
    Case("fractional-label", lambda c: train(folder(c.tmp, train=[{"text": "x", "label": i / 8} for i in range(20)])),
         ("label 0.125 is not a whole number", "bin it into classes")),
    Case("builtin-label-out-of-range", lambda c: train(builtin(c.tmp, c.monkeypatch, [0, 1, 1, 0, 1, 7])),
         ("test row 5: label 7 is out of range", "labels are ints 0..1 (negative, positive)")),
    Case("builtin-label-wrong-type", lambda c: train(builtin(c.tmp, c.monkeypatch, ["negative", "positive"])),
         ("test row 0: label 'negative' is a string", "sst2 stores labels as ints 0..1")),
    Case("label-sets-differ", lambda c: train(folder(c.tmp, test=rows(5) + [{"text": "x", "label": "maybe"}])),
         ("test labels ['maybe'] never occur in train", "every split must share one label set")),
    Case("single-label", lambda c: train(folder(c.tmp, train=[{"text": f"t{i}", "label": "a"} for i in range(9)])),
         ("single label (a)", "needs at least two", "--label-column")),
    Case("duplicate-ids", lambda c: train(folder(c.tmp, train=[{**r, "id": f"r{i % 7}"}
                                                               for i, r in enumerate(rows(20))])),
         ("train.jsonl': id 'r0' is on rows 0 and 7", "ids must be unique")),
    Case("null-generation-target", lambda c: train(gen_file(c.tmp, target=["x"] * 29 + [None]),
                                                   "--input-column", "question", "--target-column", "answer",
                                                   method="lora"),
         ("the target is missing (null)", "fix or drop the row")),
    Case("too-few-rows-to-split", lambda c: train(write_jsonl(c.tmp / "few.jsonl", rows(6))),
         ("needs at least 10 rows to split", "it has 6", "give a folder")),
    Case("labels-differ-by-case", lambda c: train(folder(c.tmp, train=rows(20) + [{"text": "x", "label": "Fruit"}])),
         ("train labels 'Fruit' and 'fruit' differ only in case or spaces", "make them one label")),
    Case("test-split-without-labels", lambda c: train(folder(c.tmp, test=[{"text": r["text"]} for r in rows(9)])),
         ("test data has no column 'label' (columns: text) though train has it", "add them to test")),
    Case("data-root-missing-split", lambda c: train(_data_root_without_train(c)),
         ("sst2' has no train file", "add train.jsonl")),
    # -- unknown names
    Case("unknown-model", lambda c: train(folder(c.tmp), model="tiny-gtp2"),
         ("unknown model 'tiny-gtp2'", "valid: smollm2-135m, minilm-l6, tiny-gpt2, tiny-llama, tiny-bert",
          "did you mean 'tiny-gpt2'?")),
    Case("unknown-method", lambda c: train(folder(c.tmp), method="lora-typo"),
         ("unknown method 'lora-typo'", "valid: full, head", "lora, prompt, prefix, adapter, ia3",
          "did you mean 'lora'?")),
    Case("unknown-task", lambda c: train("sst3"),
         ("unknown task 'sst3'", "valid: sst2, cola, sms_spam, amazon_reviews, xsum, babi", "or give a .jsonl",
          "did you mean 'sst2'?")),
    Case("unknown-pooling", lambda c: train(folder(c.tmp), "--pooling", "max"),
         ("--pooling 'max' is unknown", "valid: auto, last, first, mean")),
    Case("unknown-prompt-init", lambda c: train(folder(c.tmp), "--prompt-init", "words", method="prompt"),
         ("--prompt-init 'words' is unknown", "valid: text, vocab, random")),
    Case("unknown-adapter-placement", lambda c: train(folder(c.tmp), "--adapter", "sideways", method="adapter"),
         ("--adapter 'sideways' is unknown", "valid: houlsby, pfeiffer, parallel")),
    Case("method-file-misspelled-setting", lambda c: train(folder(c.tmp), method=put(
        c.tmp, "m.yaml", "method:\n  - lora: {lora_rank: 4}\n")),
         ("part 'lora': unknown setting(s) ['lora_rank']", "did you mean 'lora_r'?")),
    Case("experiment-unknown-setting", lambda c: ["run", put(
        c.tmp, "e.yaml", "defaults: {model: tiny-gpt2, lora_rnak: 4}\ngrid: {method: [lora]}\n")],
         ("unknown setting(s) ['lora_rnak']", "flags of `peftlab train` with underscores")),
    # -- method and model that do not fit together
    Case("label-words-on-encoder", lambda c: train(folder(c.tmp), "--head", "label-words", model="tiny-bert",
                                                   method="prompt"),
         ("label-word scoring needs a causal LM", "use --head linear")),
    Case("bitfit-without-biases", lambda c: train(folder(c.tmp), model="tiny-llama", method="bias"),
         ("needs bias terms, and this llama model has none", "choose another method")),
    Case("more-blocks-than-the-model", lambda c: train(folder(c.tmp), method="last-5"),
         ("asks for 5 blocks; the model has 2", "use N from 1 to 2")),
    Case("lora-targets-match-nothing", lambda c: train(folder(c.tmp), "--lora-targets", "q_proj", method="lora"),
         ("--lora-targets 'q_proj' matched no projection", "c_attn", "or use all-linear")),
    Case("lora-targets-bad-regex", lambda c: train(folder(c.tmp), "--lora-targets", "q_proj(", method="lora"),
         ("--lora-targets 'q_proj(' is neither a module name nor a valid regular expression", "e.g. q_proj,v_proj")),
    Case("lora-and-ia3-on-one-projection", lambda c: train(folder(c.tmp), model="tiny-llama", method="lora+ia3"),
         ("is already adapted by another method", "--lora-targets q_proj")),
    Case("multi-task-names-twice", lambda c: train(f"{folder(c.tmp / 'a')},{folder(c.tmp / 'b')}"),
         ("--task names 'toy' twice", "give each task a distinct name")),
    Case("multi-task-name-with-dot", lambda c: train(f"{write_jsonl(c.tmp / 'toy.v2.jsonl', rows(60))},{folder(c.tmp)}"),
         ("task name 'toy.v2' contains '.'", "rename the file or folder without dots")),
    Case("generation-on-encoder", lambda c: train(gen_file(c.tmp), "--input-column", "question",
                                                  "--target-column", "answer", model="tiny-bert", method="lora"),
         ("generation needs a causal LM", "e.g. tiny-gpt2")),
    # -- hyperparameters
    Case("lora-rank-zero", lambda c: train(folder(c.tmp), "--lora-r", "0", method="lora"),
         ("--lora-r must be at least 1, got 0",)),
    Case("negative-learning-rate", lambda c: train(folder(c.tmp), "--lr", "-1"),
         ("--lr must be positive, got -1.0",)),
    Case("zero-epochs", lambda c: ["train", "--model", "tiny-gpt2", "--task", folder(c.tmp), "--epochs", "0"],
         ("--epochs must be at least 1",)),
    Case("lora-dropout-out-of-range", lambda c: train(folder(c.tmp), "--lora-dropout", "1.5", method="lora"),
         ("--lora-dropout must be in [0, 1), got 1.5",)),
    Case("prompt-longer-than-context", lambda c: train(folder(c.tmp), "--virtual-tokens", "600", method="prompt"),
         ("--virtual-tokens 600 leaves no room", "512-position context", "use fewer")),
    Case("prefix-longer-than-context", lambda c: train(folder(c.tmp), "--virtual-tokens", "512", method="prefix"),
         ("--virtual-tokens 512 leaves no room", "512-position context", "use fewer")),
    Case("virtual-tokens-plus-max-length-over-context",
         lambda c: train(folder(c.tmp, **_long_texts(600)), "--virtual-tokens", "400", "--max-length", "256",
                         method="prompt"),
         ("--max-length 256", "400 virtual tokens", "512-position context")),
    Case("max-length-over-context", lambda c: train(folder(c.tmp, **_long_texts(600)), "--max-length", "1000"),
         ("--max-length 1000", "512-position context", "--max-length 512")),
    Case("template-without-placeholder", lambda c: train(folder(c.tmp), "--template", "Review:"),
         ("must contain '{text}' exactly once", "e.g. 'Review: {text}")),
    Case("label-words-count-mismatch", lambda c: train(folder(c.tmp), "--head", "label-words", "--label-words",
                                                       "yes,no,maybe", method="prompt"),
         ("3 label words for 2 labels", "give one per label")),
    Case("non-numeric-flag", lambda c: train(folder(c.tmp), "--lr", "fast"),
         ("--lr", "invalid float value: 'fast'")),
    Case("generate-zero-new-tokens", lambda c: ["generate", "tiny-gpt2", "--prompt", "hi", "--max-new-tokens", "0"],
         ("--max-new-tokens must be at least 1, got 0",)),
    Case("negative-seed", lambda c: train(folder(c.tmp), "--seed", "-1"), ("--seed must be >= 0, got -1",)),
    Case("lora-alpha-zero", lambda c: train(folder(c.tmp), "--lora-alpha", "0", method="lora"),
         ("--lora-alpha must be positive (scaling = alpha / r), got 0.0",)),
    Case("adapter-scaling-zero", lambda c: train(folder(c.tmp), "--adapter-scaling", "0", method="adapter"),
         ("--adapter-scaling must be non-zero",)),
    Case("generate-empty-prompt", lambda c: ["generate", "tiny-gpt2", "--prompt", ""],
         ("a prompt is empty", "give some text to continue")),
    Case("generate-empty-stop", lambda c: ["generate", "tiny-gpt2", "--prompt", "hi", "--stop", ""],
         ("a stop string (--stop) is empty", "give non-empty text")),
    Case("icl-no-support-fits", lambda c: ["icl", "--model", "tiny-gpt2", "--task", folder(c.tmp), "--shots", "2",
                                           "--repeats", "1", "--limit", "4", "--max-length", "6",
                                           "--out", str(c.tmp / "icl")],
         ("k=2: no support example fits beside a query in 6 tokens", "raise --max-length")),
    # -- runs and adapters
    Case("corrupt-safetensors", _corrupt_run,
         ("trainable.safetensors' is not a valid safetensors file", "re-run training")),
    Case("not-a-run-directory", lambda c: ["eval", str(c.tmp)],
         ("is not a run directory (no config.json)", "give a folder written by peftlab train")),
    Case("eval-a-model-directory", lambda c: ["eval", _model_dir(c)],
         ("is a model directory (a Hugging Face config.json), not a peftlab run", "use it as a model: --model")),
    Case("eval-an-unfinished-run", lambda c: ["eval", _unfinished_run(c)],
         ("has no trained weights yet (an unfinished run)", "peftlab train --resume")),
    Case("eval-an-in-context-cell", lambda c: ["eval", _icl_cell(c)],
         ("is an in-context cell: it trains nothing, so there is no model to load", "metrics are in")),
    Case("eval-decoding-on-a-classification-run", lambda c: ["eval", str(c.run_copy()), "--temperature", "0.7"],
         ("is a classification run: decoding settings", "apply to generation runs only")),
    Case("eval-predictions-over-a-run-file",
         lambda c: (lambda run: ["eval", str(run), "--predictions", str(run / "metrics.json")])(c.run_copy()),
         ("would overwrite that run's own file", "give another name")),
    Case("merge-into-a-run", lambda c: ["merge", str(c.run_copy()), "--out", str(c.tmp / "run")],
         ("is a run directory; writing there would overwrite its files", "give a new --out")),
    Case("merge-into-a-non-empty-folder", lambda c: ["merge", str(c.run_copy()), "--out", folder(c.tmp)],
         ("toy' already exists and is not empty", "give merge a new --out")),
    Case("compare-a-method-twice", lambda c: ["compare", "--model", "tiny-gpt2", "--task", folder(c.tmp),
                                              "--methods", "head,lora, head", "--out", str(c.tmp / "cmp")],
         ("--methods names 'head' twice", "give each method once")),
    Case("compare-into-another-compare", _other_compare,
         ("cmp' holds a compare run with other settings (head: see their config.json)", "give a new --out")),
    Case("experiment-misspelled-key", lambda c: ["run", put(c.tmp, "e.yaml", "grids: {method: [head]}\n")],
         ("has unknown key(s) ['grids']", "did you mean 'grid'?")),
    Case("experiment-list-in-defaults", lambda c: ["run", put(c.tmp, "e.yaml", "defaults: {seed: [0, 1]}\n"
                                                                                 "grid: {method: [head]}\n")],
         ("'seed' in defaults is a list", "lists of values to sweep go under grid:")),
    Case("experiment-shots-on-a-trained-method", lambda c: ["run", put(c.tmp, "e.yaml", "grid: {method: [head, icl], "
                                                                                          "shots: [0, 4]}\n")],
         ("'shots' applies to method icl only", "a grid of its own with method: [icl]")),
    Case("runs-corrupt-index", lambda c: ["runs", _corrupt_index(c)],
         ("index.sqlite' is not a readable index", "delete it and re-run the experiment")),
    Case("runs-where-double-equals", lambda c: ["runs", _index(c), "--where", "seed==0"],
         ("--where 'seed==0': write one '='", "seed=0")),
    Case("runs-where-unknown-setting", lambda c: ["runs", _index(c), "--where", "lora_rr=4"],
         ("no run here sets 'lora_rr'", "or a setting a grid varies")),
    Case("missing-run-directory", lambda c: ["eval", str(c.tmp / "nope")],
         ("run directory", "nope' does not exist", "check the path")),
    Case("init-from-another-base", lambda c: train(folder(c.tmp), "--init-from", str(c.run_copy()),
                                                   model="tiny-llama", method="lora"),
         ("trained on 'tiny-gpt2'", "this run uses 'tiny-llama'")),
    Case("experiment-invalid-yaml", lambda c: ["run", put(c.tmp, "e.yaml", "name: demo\ngrid: {method: [lora, head}\n")],
         ("e.yaml' is not valid YAML", "line 2")),
    Case("resume-with-other-flags", lambda c: ["train", "--resume", str(c.run_copy()), "--epochs", "5"],
         ("--resume continues", "with the settings in its config.json", "give no other flags")),
    Case("resume-a-finished-run", lambda c: ["train", "--resume", str(c.run_copy())],
         ("is a finished run; nothing to resume", "peftlab eval")),
    Case("resume-not-a-run", lambda c: ["train", "--resume", str(c.tmp)],
         ("is not a run directory (no config.json)", "give the --out of the run to continue")),
    Case("nproc-zero", lambda c: ["train", "--nproc", "0"], ("--nproc must be at least 1",)),
    Case("out-not-writable", lambda c: train(folder(c.tmp), "--out", str(Path(put(c.tmp, "f", "")) / "run")),
         ("cannot write to run directory", "choose another with --out")),
    # -- safe loading
    Case("model-dir-with-pickle-weights", _pickle_only_model,
         ("pytorch_model.bin' is a pickle file", "can run arbitrary code when loaded", "convert it to safetensors")),
    Case("model-file-pickle", lambda c: train(folder(c.tmp), model=put(c.tmp, "w.pt", b"\x80\x04junk")),
         ("w.pt' is a pickle file", "can run arbitrary code when loaded", "convert it to safetensors")),
    Case("model-dir-without-config", lambda c: train(folder(c.tmp), model=str(c.tmp / "toy")),
         ("has no config.json", "give a Hugging Face model directory")),
    Case("model-gguf-not-gguf", lambda c: train(folder(c.tmp), model=put(c.tmp, "m.gguf", b"junk\n")),
         ("could not be read as a GGUF model", "give a llama-family .gguf file")),
    Case("remote-code-without-flag", _remote_code_model,
         ("needs its own Python code", "pass --trust-remote-code")),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One tiny LoRA run, trained once for the cases that break a run directory."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    argv = ["train", "--model", "tiny-gpt2", "--task", folder(tmp), "--method", "lora", "--epochs", "1",
            "--train-limit", "40", "--eval-limit", "10", "--cache-features", "off", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_gives_one_line_error(case: Case, tmp_path, monkeypatch, request, capsys):
    monkeypatch.chdir(tmp_path)  # default run folders (runs/...) land here, not in the repository
    argv = case.setup(Ctx(tmp_path, monkeypatch, request))
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse exits by itself
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc == 2, err
    assert err.startswith("peftlab: error: ") and err.count("\n") == 1, err
    for fragment in case.fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    runs = tmp_path / "runs"
    assert not runs.is_dir() or all(any(d.iterdir()) for d in runs.iterdir()), "a refused run left an empty folder"
    if not any(a in argv for a in ("--out", "eval", "generate", "export", "merge", "runs", "report")):
        assert not runs.exists() or any(runs.iterdir()), "a refused run left an empty runs/ folder"


def test_catalogue_ids_are_unique_and_documented():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 30
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    assert re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.MULTILINE) == ids


def test_long_texts_are_truncated_with_a_warning_and_counted(tmp_path):
    """Texts longer than the model's 512-position context are cut to --max-length, with a warning
    per split, and metrics.json counts them."""
    long = {"text": "apple " * 600, "label": "fruit"}
    task = folder(tmp_path, train=[long] * 4 + rows(20), validation=[long] * 2 + rows(6), test=[long] + rows(6))
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        assert main(["train", "--model", "tiny-gpt2", "--task", task, "--method", "head", "--epochs", "1",
                     "--max-length", "128", "--cache-features", "off", "--out", str(out)]) == 0
    messages = [str(w.message) for w in caught]
    for n, total, split in ((4, 24, "train"), (2, 8, "validation"), (1, 7, "test")):
        assert any(f"{n} of {total} toy {split} texts are longer than 128 tokens and were truncated" in m
                   for m in messages), messages
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["truncated_texts"] == {"train": 4, "validation": 2, "test": 1}


def test_config_from_a_newer_peftlab_warns_and_ignores_unknown_keys(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["quantum_mode"] = True
    cfg["train"]["warp_factor"] = 9
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning) as caught:
        assert main(["eval", str(run)]) == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "quantum_mode" in messages and "warp_factor" in messages


# -- safe loading, below the command line ----------------------------------------------------

def _peftlab_sources() -> list[Path]:
    return sorted((Path(__file__).resolve().parents[1] / "peftlab").rglob("*.py"))


def test_nothing_in_peftlab_unpickles():
    """Only safetensors, JSON and YAML (safe loader) are read: no torch.load, pickle, unsafe YAML."""
    unsafe = re.compile(r"torch\.load\(|\bimport pickle\b|pickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|"
                        r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|use_safetensors\s*=\s*False")
    hits = [f"{p.name}: {line.strip()}" for p in _peftlab_sources()
            for line in p.read_text().splitlines() if unsafe.search(line)]
    assert hits == []


def test_trust_remote_code_is_off_unless_asked(monkeypatch):
    from transformers import AutoConfig

    from peftlab import models
    from peftlab.runconfig import RunConfig

    assert inspect.signature(models.load_backbone).parameters["trust_remote_code"].default is False
    assert RunConfig().trust_remote_code is False  # the --trust-remote-code flag's default
    seen = []

    def fake(name, **kw):  # record the flag, then stop before anything loads
        seen.append(kw.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(AutoConfig, "from_pretrained", fake)
    with pytest.raises(PeftlabError):
        models.load_backbone("someone/some-model")
    with pytest.raises(PeftlabError):
        models.load_backbone("someone/some-model", trust_remote_code=True)
    assert seen == [False, True]


def _saved_adapter(tmp_path: Path, name: str = "tiny-gpt2") -> Path:
    from peftlab.heads import Classifier
    from peftlab.methods import MethodArgs, parse_method, trainable_names
    from peftlab.models import load_backbone
    from peftlab.peft_format import save_adapter

    b = load_backbone(name)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer)
    method = parse_method("lora", MethodArgs(lora_targets="c_attn"))
    method.apply(m)
    save_adapter(tmp_path / "adapter", method, m, b.model, trainable_names(m, method), name)
    return tmp_path / "adapter"


def _fresh(name: str):
    from peftlab.heads import Classifier
    from peftlab.models import load_backbone

    b = load_backbone(name)
    return b, Classifier(b.arch, 2, tokenizer=b.tokenizer)


def test_peft_adapter_with_pickle_weights_is_refused(tmp_path):
    from peftlab.peft_format import load_adapter

    adapter = _saved_adapter(tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    b, m = _fresh("tiny-gpt2")
    with pytest.raises(PeftlabError, match="adapter_model.bin' is a pickle file.*arbitrary code.*safetensors"):
        load_adapter(adapter, m, b.model)


def test_peft_adapter_for_another_base_is_refused(tmp_path):
    from peftlab.peft_format import load_adapter

    adapter = _saved_adapter(tmp_path, "tiny-gpt2")
    b, m = _fresh("tiny-llama")
    with pytest.raises(PeftlabError, match="trained on 'tiny-gpt2', not on 'tiny-llama'"):
        load_adapter(adapter, m, b.model, base="tiny-llama")
    b, m = _fresh("tiny-llama")  # no base name to compare: the tensors themselves do not fit
    with pytest.raises(PeftlabError, match="another base model"):
        load_adapter(adapter, m, b.model)


def test_peft_adapter_with_other_shapes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from peftlab.peft_format import load_adapter

    adapter = _saved_adapter(tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = weights[key][:4].contiguous()  # rank 8 -> 4 in one layer
    save_file(weights, adapter / "adapter_model.safetensors")
    b, m = _fresh("tiny-gpt2")
    with pytest.raises(PeftlabError, match=r"has shape \(4, 64\), the model expects \(8, 64\)"):
        load_adapter(adapter, m, b.model, base="tiny-gpt2")


def test_the_python_api_checks_types_and_takes_numpy_numbers_and_paths():
    import numpy as np

    from peftlab import RunConfig, TrainArgs
    from peftlab.decode import Sampling
    from peftlab.methods import MethodArgs

    for make, message in [(lambda: TrainArgs(epochs="2"), "TrainArgs: 'epochs' must be int, got '2'"),
                          (lambda: TrainArgs(batch_size=16.5), "'batch_size' must be int, got 16.5"),
                          (lambda: RunConfig(task=3), "RunConfig: 'task' must be str, got 3"),
                          (lambda: RunConfig(train={"epoch": 2}), "unknown setting(s) ['epoch']; did you mean 'epochs'?"),
                          (lambda: MethodArgs(lora_r="8"), "'lora_r' must be int, got '8'"),
                          (lambda: Sampling(top_p="0.9"), "'top_p' must be float, got '0.9'")]:
        with pytest.raises(PeftlabError) as e:
            make()
        assert message in str(e.value)
    cfg = RunConfig(seed=np.int64(1), out=Path("runs/x"), train=TrainArgs(lr=np.float32(0.5), batch_size=16.0),
                    method_args=MethodArgs(lora_r=np.int64(4)))
    values = (cfg.seed, cfg.out, cfg.train.lr, cfg.train.batch_size, cfg.method_args.lora_r)
    assert values == (1, "runs/x", 0.5, 16, 4) and [type(v) for v in values] == [int, str, float, int, int]
    json.dumps(asdict(cfg))  # plain values: config.json stays loadable


def test_import_peftlab_and_the_cli_flags_are_light_and_every_export_resolves():
    """Neither `import peftlab` nor building the CLI's flags nor `peftlab models` imports torch
    (`peftlab --help` and a mistyped flag answer in 0.05 s, not 6); every public name resolves on first use, and
    `compare` is the function, not its module."""
    code = ("import sys, inspect, peftlab\n"
            "from peftlab.cli import build_parser, main\n"
            "build_parser()\n"
            "assert main(['models']) == 0\n"
            "assert 'torch' not in sys.modules, 'import peftlab, the CLI flags or peftlab models imported torch'\n"
            "import peftlab.comparison\n"
            "assert inspect.isfunction(peftlab.compare)\n"
            "from peftlab import *\n"
            "missing = [n for n in peftlab.__all__ if n not in globals()]\n"
            "assert not missing and sorted(peftlab.__all__) == sorted(peftlab._EXPORTS), missing\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=300, capture_output=True, text=True)
    assert "smollm2-135m" in out.stdout
