import json
import os

import pytest

# Tests never reach the network: hub lookups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = ("tiny-gpt2", "tiny-llama", "tiny-bert")


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def toy_task(tmp_path):
    """A folder task a tiny model can learn: label 1 iff the text mentions a fruit."""
    import random

    rng = random.Random(0)
    fruit = ["apple", "banana", "cherry", "mango"]
    other = ["table", "river", "cloud", "stone", "music", "window", "garden", "paper", "train", "light"]

    def rows(n):
        out = []
        for _ in range(n):
            words = rng.sample(other, 4)
            label = rng.random() < 0.5
            if label:
                words.insert(rng.randrange(5), rng.choice(fruit))
            out.append({"text": " ".join(words), "label": "fruit" if label else "none"})
        return out

    for split, n in (("train", 400), ("validation", 100), ("test", 200)):
        write_jsonl(tmp_path / "toy" / f"{split}.jsonl", rows(n))
    return str(tmp_path / "toy")
