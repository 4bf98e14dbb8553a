"""Generation: label masking, the LM loss, separator tokens, stop strings, streaming, runs."""

import io
import json
import random

import pytest
import torch

from peftlab.cli import main
from peftlab.decode import generate, trim_at_stop
from peftlab.errors import PeftlabError
from peftlab.generation import collate_pairs, encode_pairs, lm_loss, load_gen_task
from peftlab.heads import LanguageModel
from peftlab.models import load_backbone
from peftlab.generator import StreamPrinter, load_generator
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.saved import eval_run
from peftlab.train import TrainArgs
from tests.conftest import write_jsonl

TEMPLATE = "Story: {text}\nAnswer:"


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_exactly_the_target_and_eos_carry_loss(name):
    tok = load_backbone(name).tokenizer
    texts, targets = ["a long story about the kitchen", "short"], ["kitchen", "the hallway"]
    pairs = encode_pairs(texts, targets, tok, TEMPLATE, max_length=64)
    b = collate_pairs(pairs, [0, 1], tok.pad_token_id)
    for row, text, target in zip(range(2), texts, targets):
        prompt = tok(TEMPLATE.replace("{text}", text))["input_ids"]
        want = tok(" " + target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labelled = b["labels"][row][b["labels"][row] != -100].tolist()
        assert labelled == want  # exactly the target tokens and EOS
        assert pairs.prompt_len[row] == len(prompt)  # counted in tokens of the prompt
        real = b["input_ids"][row][b["attention_mask"][row] == 1].tolist()
        assert real == prompt + want


def test_chat_frames_the_input_with_the_models_template_once():
    tok = load_backbone("tiny-llama").tokenizer  # SmolLM2's tokenizer and chat template
    pairs = encode_pairs(["hi"], ["yes"], tok, "Q: {text}", 64, chat=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "Q: hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.rstrip().endswith("assistant")  # the assistant's turn is opened
    want = tok(chat, add_special_tokens=False)["input_ids"]
    assert pairs.input_ids[0][:pairs.prompt_len[0]] == want  # framed once, no extra special tokens
    assert pairs.input_ids[0][pairs.prompt_len[0]:] == tok(" yes", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


def test_long_inputs_are_shortened_keeping_template_and_target():
    tok = load_backbone("tiny-llama").tokenizer
    pairs = encode_pairs(["word " * 200], ["the end"], tok, TEMPLATE, max_length=32)
    assert len(pairs.input_ids[0]) == 32 and pairs.truncated == 1
    text = tok.decode(pairs.input_ids[0])
    assert text.startswith("Story: word") and text.endswith("\nAnswer: the end" + tok.eos_token)
    front = encode_pairs(["first " + "word " * 200 + "last"], ["x"], tok, TEMPLATE, 32, keep_end=True)
    assert "last\nAnswer:" in tok.decode(front.input_ids[0]) and "first" not in tok.decode(front.input_ids[0])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_lm_loss_equals_transformers_loss(name):
    b = load_backbone(name)
    m = LanguageModel(b.arch, b.tokenizer).eval()
    pairs = encode_pairs(["the cat sat on the mat", "hi"], ["mat", "there you are"], b.tokenizer, TEMPLATE, 64)
    batch = collate_pairs(pairs, [0, 1], b.tokenizer.pad_token_id)
    with torch.no_grad():
        total = lm_loss(m, batch, reduction="sum")
        want = 0.0
        for i in range(2):  # each row alone, unpadded, through plain transformers
            ids = torch.tensor([pairs.input_ids[i]])
            labels = ids.clone()
            labels[0, :pairs.prompt_len[i]] = -100
            n = int((labels[0, 1:] != -100).sum())
            want += b.model(input_ids=ids, labels=labels).loss * n
    torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-5)


def test_separator_token_trains_its_own_embedding_only():
    b = load_backbone("tiny-llama")
    m = LanguageModel(b.arch, b.tokenizer, sep_token="<|sep|>")
    sep = m.head.id
    assert sep == len(b.tokenizer) - 1 and sep >= b.arch.embeddings.weight.shape[0]  # new, beyond the matrix
    pairs = encode_pairs(["the cat"], ["mat"], b.tokenizer, TEMPLATE, 64, sep_ids=(sep,))
    assert pairs.input_ids[0][pairs.prompt_len[0] - 1] == sep  # last prompt token, before the target
    for p in m.parameters():
        p.requires_grad_(False)
    m.head.vector.requires_grad_(True)
    loss = lm_loss(m, collate_pairs(pairs, [0], b.tokenizer.pad_token_id))
    loss.backward()
    assert m.head.vector.grad.abs().sum() > 0
    emb = b.arch.embeddings(torch.tensor([[sep, 5]]))
    torch.testing.assert_close(emb[0, 0], m.head.vector)  # the separator reads the trained vector


def test_stop_strings_end_rows_and_are_cut():
    b = load_backbone("tiny-llama")
    m = LanguageModel(b.arch, b.tokenizer).eval()
    tok = b.tokenizer
    batch = tok(["The cat sat on the", "Hello"], padding=True, return_tensors="pt")
    free = generate(m, batch["input_ids"], batch["attention_mask"], 12)
    text = tok.decode(free[0], skip_special_tokens=True).lstrip()
    stop = text[len(text) // 2:len(text) // 2 + 2]  # a string the first row is sure to produce
    out = generate(m, batch["input_ids"], batch["attention_mask"], 12, stop_strings=(stop,), tokenizer=tok)
    first = tok.decode(out[0][out[0] != 0], skip_special_tokens=True)
    assert stop in first and trim_at_stop(first, (stop,)) == text[:text.index(stop)]
    assert trim_at_stop("\n Paris\nand more", ("\n",)) == "Paris"
    with pytest.raises(ValueError, match="tokenizer"):
        generate(m, batch["input_ids"], batch["attention_mask"], 2, stop_strings=("x",))


def test_streaming_prints_what_generation_returns():
    g = load_generator("tiny-llama")
    want = g.generate(["The cat sat on the"], max_new_tokens=10, stop_strings=("e",))
    out = io.StringIO()
    got = g.generate(["The cat sat on the"], max_new_tokens=10, stop_strings=("e",), stream=out)
    assert got == want and out.getvalue().strip() == want[0]
    printer = StreamPrinter(g.tokenizer, ("\nQ",), io.StringIO())
    printer.ids = g.tokenizer(" Paris\nQ", add_special_tokens=False)["input_ids"][:-1]
    assert printer.visible() == "Paris"  # "\n" may begin the stop string: held back


@pytest.fixture
def toy_gen(tmp_path):
    """Answer with the animal named after 'the': a tiny model can learn it."""
    rng = random.Random(0)
    animals, filler = ["cat", "dog", "fish", "bird"], ["red", "big", "old", "new", "far", "near"]

    def rows(n):
        out = []
        for _ in range(n):
            a = rng.choice(animals)
            words = rng.sample(filler, 3)
            words.insert(rng.randrange(4), f"the {a}")
            out.append({"story": " ".join(words), "answer": a})
        return out

    for split, n in (("train", 300), ("validation", 40), ("test", 60)):
        write_jsonl(tmp_path / "gen" / f"{split}.jsonl", rows(n))
    return str(tmp_path / "gen")


def test_a_tiny_model_learns_a_toy_generation_task(toy_gen, tmp_path, capsys):
    cfg = RunConfig(model="tiny-llama", task=toy_gen, method="full", input_column="story", target_column="answer",
                    max_new_tokens=4, out=str(tmp_path / "run"), train=TrainArgs(epochs=4, batch_size=16, lr=3e-3))
    r = train_run(cfg, progress=False)
    assert r["kind"] == "generation" and r["metric"] == "rougeL"
    assert r["test"]["exact_match"] >= 90, r["test"]
    assert r["history"][-1]["val_loss"] < r["history"][0]["val_loss"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 60 and all(x.keys() == {"input", "output", "reference"} for x in lines)
    assert all(f"the {x['reference']}" in x["input"] for x in lines)  # each row's own prompt
    assert eval_run(tmp_path / "run")["exact_match"] == pytest.approx(r["test"]["exact_match"])
    # other decoding settings, seeded, with the outputs written where asked
    argv = ["eval", str(tmp_path / "run"), "--temperature", "2", "--seed", "3", "--max-new-tokens", "1"]
    for name in ("a.jsonl", "b.jsonl"):
        assert main([*argv, "--predictions", str(tmp_path / name)]) == 0
    a, b = ((tmp_path / n).read_text() for n in ("a.jsonl", "b.jsonl"))
    assert a == b and a != (tmp_path / "run" / "predictions.jsonl").read_text()  # same seed, same samples
    # a flag not given keeps the run's setting: a run saved with temperature 2 samples at 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["decoding"]["temperature"] = 2.0
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert main([a for a in argv if a not in ("--temperature", "2")] + ["--predictions", str(tmp_path / "c.jsonl")]) == 0
    assert (tmp_path / "c.jsonl").read_text() == a
    config["decoding"]["temperature"] = 0.0
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    # the CLI continues a prompt framed like the training data
    assert main(["generate", str(tmp_path / "run"), "--prompt", "old the dog far near"]) == 0
    assert capsys.readouterr().out.strip() == "dog"


def test_generation_tasks_load_and_bad_input_fails_clearly(toy_gen):
    babi = load_gen_task("babi1")
    assert len(babi.splits["train"]) == 900 and babi.metric == "exact_match"
    assert "Question: " in babi.splits["test"][0]["text"]
    assert len(load_gen_task("xsum").splits["test"]) == 200
    with pytest.raises(PeftlabError, match="--input-column and --target-column"):
        load_gen_task(toy_gen, target_column="answer")
    with pytest.raises(PeftlabError, match="no column 'summary'"):
        load_gen_task(toy_gen, input_column="story", target_column="summary")
    with pytest.raises(PeftlabError, match="classification run|generation needs"):
        LanguageModel(load_backbone("tiny-bert").arch, None)
