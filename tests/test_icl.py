"""In-context learning: k-shot prompts, label-word scoring of them, the per-k report."""

import dataclasses
import json
import warnings

import pytest
import torch

from peftlab import icl, icl_report
from peftlab.batching import fill
from peftlab.data import load_task
from peftlab.errors import PeftlabError
from peftlab.heads import Classifier
from peftlab.icl import (
    SEP,
    build_prompt,
    encode_prompts,
    icl_classify,
    parse_shots,
    run_icl,
    score_prompts,
    support_blocks,
)
from peftlab.models import load_backbone
from peftlab.speed import resolve
from tests.conftest import write_jsonl

TEMPLATE = "Words: {text}\nKind:"


@pytest.fixture
def marked(tmp_path) -> str:
    """A folder task whose texts name their split and row ("train-7 apple"): a prompt shows its sources."""
    for split, n in (("train", 40), ("validation", 6), ("test", 12)):
        rows = [{"text": f"{split}-{i} {'apple' if i % 2 else 'stone'}", "label": ("plain", "fruit")[i % 2]}
                for i in range(n)]
        write_jsonl(tmp_path / "marked" / f"{split}.jsonl", rows)
    return str(tmp_path / "marked")


def framed(path: str, **kw):
    """The task at `path` with TEMPLATE (and any other field) set."""
    return dataclasses.replace(load_task(path), template=TEMPLATE, **kw)


def rendered_train(task) -> set[str]:
    return {fill(TEMPLATE, r["text"]) + " " + task.words[r["label"]] for r in task.splits["train"]}


@pytest.mark.parametrize("k", [0, 1, 5])
def test_prompt_holds_k_train_examples_then_the_query(marked, k):
    task = framed(marked)
    parts = build_prompt(task, task.splits["train"], "test-3 apple", k, seed=0).split(SEP)
    assert len(parts) == k + 1 and parts[-1] == "Words: test-3 apple\nKind:"  # the query last, unanswered
    assert set(parts[:-1]) <= rendered_train(task) and len(set(parts[:-1])) == k  # k distinct train rows
    assert all(p.endswith((" fruit", " plain")) for p in parts[:-1])


def test_the_draw_is_seeded(marked):
    task = framed(marked)
    train = task.splits["train"]
    a, b, c = (build_prompt(task, train, "q", 8, s) for s in (0, 0, 1))
    assert a == b and a != c
    every = [support_blocks(task, train, len(train), s) for s in (0, 1)]
    assert sorted(every[0]) == sorted(every[1]) and every[0] != every[1]  # same rows, another order
    assert support_blocks(task, train, 3, 0) == every[0][:3]  # a smaller k takes a prefix of the draw


def test_support_examples_come_from_train_only(marked, monkeypatch):
    seen = []
    real = icl.encode_prompts
    monkeypatch.setattr(icl, "encode_prompts", lambda task, tok, blocks, queries, *a: (
        seen.append((blocks, queries)) or real(task, tok, blocks, queries, *a)))
    task = framed(marked)
    records = icl_classify(load_backbone("tiny-gpt2"), task, [3, 0], repeats=2, limit=6, progress=False)
    assert [r["k"] for r in records] == [0, 3] and [len(r["values"]) for r in records] == [1, 2]
    assert records[0]["std"] == 0.0 and records[1]["seeds"] == [0, 1]
    assert [len(b) for b, _ in seen] == [0, 3, 3] and seen[1][0] != seen[2][0]  # a new draw per repeat
    assert all(set(b) <= rendered_train(task) for b, _ in seen)
    assert all(len(q) == 6 and all(t.startswith("test-") for t in q) for _, q in seen)
    r = records[1]
    assert r["metric"] == "accuracy" and r["mean"] == r["metrics"]["accuracy"]["mean"] and r["rows"] == 6
    assert set(r["metrics"]) == {"accuracy", "macro_f1", "mcc"} and r["seconds"] > 0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("words", [("fruit", "plain"), ("a fruit salad", "plain")])  # one token; several
def test_batched_padded_scores_equal_each_prompt_alone(marked, name, words):
    b = load_backbone(name)
    task = framed(marked, words=words)
    model = Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=words).eval()
    queries = ["test-1 apple", "a much longer query: a stone, a river and a cloud", "x", "test-4 stone pear"]
    blocks = support_blocks(task, task.splits["train"], 3, seed=0)
    enc, dropped = encode_prompts(task, b.tokenizer, blocks, queries, [1, 0, 0, 1], max_length=512)
    assert dropped == 0 and len(set(enc.lengths.tolist())) == len(queries)  # every batch is padded
    got = score_prompts(model, b.tokenizer, enc, batch_size=3)
    with torch.no_grad():
        for i, q in enumerate(queries):
            ids = b.tokenizer(build_prompt(task, task.splits["train"], q, 3, seed=0), return_tensors="pt")
            alone = model(ids["input_ids"], ids["attention_mask"])[0]
            torch.testing.assert_close(torch.from_numpy(got[i]), alone, atol=1e-5, rtol=1e-5)


def test_long_prompts_drop_the_oldest_examples_and_keep_the_query(marked):
    tok = load_backbone("tiny-gpt2").tokenizer
    task = framed(marked)
    blocks = support_blocks(task, task.splits["train"], 8, seed=0)
    kept = SEP.join([*blocks[5:], fill(TEMPLATE, "test-2 stone")])  # the 3 newest examples and the query
    budget = len(tok(kept)["input_ids"])
    enc, dropped = encode_prompts(task, tok, blocks, ["test-2 stone", "x"], [0, 0], budget)
    assert tok.decode(enc.input_ids[0]) == kept and dropped == 5 + 5 and enc.truncated == 2
    assert max(enc.lengths) <= budget
    # a query too long on its own: its text is cut, the frame kept whole
    with pytest.warns(UserWarning, match="truncated"):
        enc, dropped = encode_prompts(task, tok, blocks, ["stone " * 100], [0], 12)
    text = tok.decode(enc.input_ids[0])
    assert dropped == 8 and len(enc.input_ids[0]) <= 12
    assert text.startswith("Words: stone") and text.endswith("\nKind:")


def test_over_long_prompts_warn_once_per_k_and_fit_the_context(tmp_path):
    long = [{"text": "stone river cloud " * 12, "label": "plain"}, {"text": "apple " * 30, "label": "fruit"}]
    long *= 20
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / "long" / f"{split}.jsonl", long)
    task = framed(str(tmp_path / "long"))
    b = load_backbone("tiny-gpt2")  # 512 positions, below the default max_length of 1024
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = icl_classify(b, task, [0, 30], repeats=1, limit=4, progress=False)
    msgs = [str(w.message) for w in caught if "support examples" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("k=30: 4 of 4 prompts were over 511 tokens")
    assert records[1]["shortened"] == 4 and records[1]["dropped"] > 0 and records[1]["prompt_tokens"] <= 511
    assert records[0]["shortened"] == 0


def test_bad_input_fails_clearly(marked):
    task = framed(marked)
    b = load_backbone("tiny-gpt2")
    bad = [
        ({"shots": [41]}, "k=41 is larger than the train split \\(40 rows\\)"),
        ({"shots": [-1]}, "must be >= 0"),
        ({"shots": []}, "at least one k"),
        ({"shots": [1], "repeats": 0}, "--repeats must be at least 1"),
        ({"shots": [1], "limit": 0}, "--limit must be at least 1"),
        ({"shots": [1], "batch_size": 0}, "--batch-size"),
        ({"shots": [1], "seed": -1}, "--seed must be >= 0"),
    ]
    for kw, match in bad:
        with pytest.raises(PeftlabError, match=match):
            icl_classify(b, task, progress=False, **kw)
    with pytest.raises(PeftlabError, match="larger than the train split"):
        build_prompt(task, task.splits["train"], "q", 41, seed=0)
    with pytest.raises(PeftlabError, match="comma-separated whole numbers"):
        parse_shots("0,four")
    assert parse_shots("0, 1,4,") == [0, 1, 4]
    with pytest.raises(PeftlabError, match="in-context learning needs a causal LM with an LM head; 'tiny-bert'"):
        icl_classify(load_backbone("tiny-bert"), task, [0], progress=False)
    with pytest.raises(PeftlabError, match="--repeats"):
        run_icl("tiny-gpt2", marked, [0], repeats=0, out_dir="unused")  # fails before loading anything


def test_run_icl_checks_its_inputs_before_making_a_folder(marked, tmp_path):
    with pytest.raises(PeftlabError, match="larger than the train split"):
        run_icl("tiny-gpt2", marked, [0, 41], out_dir=tmp_path / "a", progress=False)
    with pytest.raises(PeftlabError, match="causal LM"):
        run_icl("tiny-bert", marked, [0], out_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_icl_writes_records_table_and_curve(marked, tmp_path, capsys):
    out = tmp_path / "icl"
    records = run_icl("tiny-llama", marked, [0, 2], repeats=2, limit=6, out_dir=out, progress=False)
    assert json.loads((out / "icl.json").read_text()) == records
    table = (out / "icl.md").read_text()
    assert "| k | draws | accuracy | macro_f1 | mcc |" in table
    assert table.count("\n| ") == 3  # the header and two rows
    assert (out / "icl_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "In-context learning, tiny-llama on marked" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_classifies_sst2_in_context():
    """The real model and data, 64 test rows. Zero-shot is well above chance (50%); one random 4-shot
    draw is not better for a 135M model (SST-2's train rows are short phrases, and the draw's labels
    bias the answers), so its bar only guards the pipeline. Measured: 0.844 and 0.594 in fp32, 0.828
    and 0.609 under bf16 (the default where the CPU has it, 2026-11-24)."""
    records = icl_classify(load_backbone("smollm2-135m"), load_task("sst2"), [0, 4], repeats=1, limit=64,
                           progress=False)
    acc = {r["k"]: r["metrics"]["accuracy"]["mean"] for r in records}
    assert acc[0] >= 0.75 and acc[4] >= 0.55, acc
    assert records[1]["prompt_tokens"] > 3 * records[0]["prompt_tokens"]  # the examples are in the prompt


def test_generation_icl_prompts_decode_and_score(monkeypatch, tmp_path):
    """On a generation task the k-shot prompt carries each support example's target; the CLI writes the report."""
    from peftlab.generation import GenTask
    from datasets import Dataset

    rows = lambda n, tag: Dataset.from_dict({"text": [f"{tag}{i}" for i in range(n)],
                                             "target": [f"t{i}" for i in range(n)]})
    task = GenTask("toy", "exact_match", "Q: {text}\nA:", 3, False,
                   {"train": rows(10, "train"), "validation": rows(2, "val"), "test": rows(4, "test")})
    seen = []
    real_complete = icl.complete

    def spy(model, tok, prompts, **kw):
        seen.extend(tok.decode(x) for x in prompts.input_ids)
        return real_complete(model, tok, prompts, **kw)

    monkeypatch.setattr(icl, "complete", spy)
    records = icl.icl_generate(load_backbone("tiny-llama"), task, [0, 2], repeats=2, progress=False)
    assert [r["k"] for r in records] == [0, 2] and len(records[1]["values"]) == 2
    assert records[0]["percent"] and set(records[0]["metrics"]) >= {"exact_match", "rougeL"}
    zero, two = seen[0], seen[4]
    assert zero == "Q: test0\nA:"
    assert two.count("\nA: t") == 2 and two.endswith(SEP + "Q: test0\nA:") and "train" in two
    md = icl_report.markdown_table(records)
    assert "exact_match" in md and "MCC" not in md
    icl_report.plot_curve(records, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_cli_icl(marked, tmp_path, capsys):
    from peftlab.cli import main

    out = tmp_path / "icl"
    assert main(["icl", "--model", "tiny-llama", "--task", marked, "--shots", "0,2", "--repeats", "2",
                 "--out", str(out)]) == 0
    records = json.loads((out / "icl.json").read_text())
    assert records[1]["k"] == 2 and (out / "icl_curve.png").is_file()
    assert records[0]["precision"] == resolve("auto")  # bf16 autocast where the CPU has it
    assert main(["icl", "--model", "tiny-llama", "--task", marked, "--shots", "0", "--precision", "fp32",
                 "--out", str(out)]) == 0
    assert json.loads((out / "icl.json").read_text())[0]["precision"] == "fp32"
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'fp16' (choose from 'auto', 'bf16', 'fp32')"
        main(["icl", "--model", "tiny-llama", "--task", marked, "--precision", "fp16"])
    assert main(["icl", "--model", "tiny-llama", "--task", marked, "--shots", "x"]) == 2
    assert "--shots" in capsys.readouterr().err
