import json
import os

import pytest

# Tests never reach the network: hub lookups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = ("tiny-gpt2", "tiny-llama", "tiny-bert")


def interrupt_run(monkeypatch, cfg, step: int) -> str:
    """Train `cfg` in this process until it raises KeyboardInterrupt at optimizer step `step`
    (as Ctrl-C would), leaving the run directory as an interrupted run leaves it. Returns what
    the interruption says (the CLI prints it)."""
    import torch

    from peftlab.run import train_run

    calls, real = {"n": 0}, torch.optim.AdamW.step

    def stop(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", stop)
    with pytest.raises(KeyboardInterrupt) as e:
        train_run(cfg, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    return str(e.value)


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_rows(n: int, rng) -> list[dict]:
    """Rows of the toy task: label 'fruit' iff the text names a fruit (`rng`: a random.Random)."""
    out = []
    for _ in range(n):
        words = rng.sample(["table", "river", "cloud", "stone", "music", "window", "garden", "paper", "train",
                            "light"], 4)
        label = rng.random() < 0.5
        if label:
            words.insert(rng.randrange(5), rng.choice(["apple", "banana", "cherry", "mango"]))
        out.append({"text": " ".join(words), "label": "fruit" if label else "none"})
    return out


@pytest.fixture
def toy_task(tmp_path):
    """A folder task a tiny model can learn: label 1 iff the text mentions a fruit."""
    return write_toy_task(tmp_path / "toy", (400, 100, 200))


def write_toy_task(folder, sizes: tuple[int, int, int], seed: int = 0) -> str:
    """The toy task's train/validation/test files in `folder`, with these many rows."""
    import random

    rng = random.Random(seed)
    for split, n in zip(("train", "validation", "test"), sizes):
        write_jsonl(folder / f"{split}.jsonl", toy_rows(n, rng))
    return str(folder)


def adapted(name: str, spec: str | None = None, **kw):
    """A tiny backbone (by name), a 2-way Classifier on it seeded at 0, and the method applied."""
    import torch

    from peftlab.heads import Classifier
    from peftlab.methods import MethodArgs, parse_method, set_trainable, trainable_names
    from peftlab.models import load_backbone

    b = load_backbone(name)
    torch.manual_seed(0)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer).eval()
    method = None
    if spec:
        method = parse_method(spec, MethodArgs(**kw))
        method.apply(m)
        set_trainable(m, trainable_names(m, method))
    return b, m, method


def fit(m, ids, y, steps: int, lr: float) -> list[float]:
    """Full-batch AdamW steps on (ids, y); the losses."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(m(ids, torch.ones_like(ids)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_rows_pool_as_alone(tokenizer, m) -> None:
    """Each row of a padded batch gives the logits it gives alone."""
    import torch

    texts = ["a much longer sentence than the other one", "short"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        together = m(batch["input_ids"], batch["attention_mask"])
        for i, t in enumerate(texts):
            alone = tokenizer([t], return_tensors="pt")
            torch.testing.assert_close(together[i], m(alone["input_ids"], alone["attention_mask"])[0],
                                       atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def feature_cache_in_tmp(tmp_path, monkeypatch):
    """Cached features go to the test's own folder, never the user's cache."""
    import peftlab.features

    monkeypatch.setattr(peftlab.features, "features_dir", lambda: tmp_path / "features")
    return tmp_path / "features"


@pytest.fixture
def task_pair(tmp_path):
    """Two folder tasks a tiny model can learn, of different sizes and label sets:
    'fruit' (2 labels: a fruit word or not), 'colour' (3 labels: red / blue / no colour word)."""
    import random

    rng = random.Random(1)
    filler = ["table", "river", "cloud", "stone", "music", "window", "garden", "paper", "train", "light"]

    def rows(n, kind):
        out = []
        for _ in range(n):
            words = rng.sample(filler, 4)
            if kind == "fruit":
                label = rng.choice(["fruit", "none"])
                if label == "fruit":
                    words.insert(rng.randrange(5), rng.choice(["apple", "banana", "cherry"]))
            else:
                label = rng.choice(["red", "blue", "none"])
                if label != "none":
                    words.insert(rng.randrange(5), {"red": rng.choice(["red", "crimson"]),
                                                    "blue": rng.choice(["blue", "navy"])}[label])
            out.append({"text": " ".join(words), "label": label})
        return out

    for name, n in (("fruit", 300), ("colour", 150)):
        for split, k in (("train", n), ("validation", 90), ("test", 120)):
            write_jsonl(tmp_path / name / f"{split}.jsonl", rows(k, name))
    return str(tmp_path / "fruit"), str(tmp_path / "colour")
