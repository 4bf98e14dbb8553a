"""Label-word scoring: a frozen LM classifies by the log-probability of each label's words."""

import pytest
import torch

from peftlab.batching import encode
from peftlab.errors import PeftlabError
from peftlab.heads import Classifier
from peftlab.models import load_backbone
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs
from tests.conftest import adapted, assert_rows_pool_as_alone

TEXTS = ["the film was a quiet delight", "awful"]


def reference_scores(b, text: str, words: tuple[str, ...]) -> torch.Tensor:
    """log p(words | text) from the plain transformers LM, one unpadded sequence per label."""
    tok = b.tokenizer
    prompt = tok(text)["input_ids"]
    out = []
    for w in words:
        word = tok(" " + w, add_special_tokens=False)["input_ids"]
        logp = b.model(torch.tensor([prompt + word])).logits[0].log_softmax(-1)
        out.append(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(word)))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("words", [("no", "yes"), ("terrible movie", "great")])  # one token, several
def test_scores_are_the_lms_log_probabilities(name, words):
    b = load_backbone(name)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=words).eval()
    assert len(list(m.head.parameters())) == 0  # nothing new to train
    batch = b.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = m(batch["input_ids"], batch["attention_mask"])
        for i, t in enumerate(TEXTS):
            torch.testing.assert_close(got[i], reference_scores(b, t, words), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_one_token_shortcut_equals_the_general_path(name):
    b = load_backbone(name)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=("no", "yes")).eval()
    batch = b.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        short = m(batch["input_ids"], batch["attention_mask"])
        m.head.word_ids = torch.cat([m.head.word_ids, torch.zeros_like(m.head.word_ids)], 1)
        m.head.word_mask = torch.cat([m.head.word_mask, torch.zeros_like(m.head.word_mask)], 1)
        torch.testing.assert_close(m(batch["input_ids"], batch["attention_mask"]), short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["prompt", "prefix", "lora"])
def test_padded_rows_score_as_alone_with_methods(spec):
    b, _, _ = adapted("tiny-llama")
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=("bad movie", "good")).eval()
    from peftlab.methods import MethodArgs, parse_method

    parse_method(spec, MethodArgs(virtual_tokens=3)).apply(m)
    assert_rows_pool_as_alone(b.tokenizer, m)


def test_label_word_scoring_learns(toy_task, tmp_path):
    cfg = RunConfig(model="tiny-llama", task=toy_task, method="full", head="label-words", label_words="fruit,plain",
                    template="Words: {text}\nKind:", out=str(tmp_path / "run"),
                    train=TrainArgs(epochs=4, batch_size=16, lr=3e-3))
    r = train_run(cfg, progress=False)
    assert r["trainable_params"] > 0 and r["test"]["accuracy"] >= 0.9, r["test"]


def test_bad_label_word_setups_fail_clearly(toy_task, tmp_path):
    b = load_backbone("tiny-bert")
    with pytest.raises(PeftlabError, match="causal LM"):
        Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=("no", "yes"))
    g = load_backbone("tiny-gpt2")
    with pytest.raises(PeftlabError, match="one per label"):
        Classifier(g.arch, 3, tokenizer=g.tokenizer, label_words=("no", "yes"))
    with pytest.raises(PeftlabError, match="trains nothing"):
        train_run(RunConfig(model="tiny-gpt2", task=toy_task, method="head", head="label-words",
                            out=str(tmp_path / "x")), progress=False)


def test_templates_frame_texts_and_truncation_keeps_the_frame():
    tok = load_backbone("tiny-gpt2").tokenizer
    template = "Review: {text}\nSentiment:"
    with pytest.warns(UserWarning, match="truncated"):
        enc = encode(["word " * 100, "fine {braces}"], [0, 1], tok, max_length=16, template=template)
    assert len(enc.input_ids[0]) <= 16 and enc.truncated == 1
    assert tok.decode(enc.input_ids[0]).endswith("\nSentiment:")
    assert tok.decode(enc.input_ids[1]) == "Review: fine {braces}\nSentiment:"
    with pytest.raises(PeftlabError, match="exactly once"):
        encode(["x"], [0], tok, 16, template="no marker")
