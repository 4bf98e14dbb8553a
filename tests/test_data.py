import numpy as np
import pytest

from peftlab.batching import Encoded, batch_indices, collate, encode, eval_batches
from peftlab.data import TASKS, load_task, subset
from peftlab.errors import PeftlabError
from peftlab.models import load_backbone
from tests.conftest import write_jsonl


def test_builtin_task_from_shared_data():
    t = load_task("sms_spam")
    assert t.labels == ("ham", "spam") and t.metric == "macro_f1"
    assert [len(t.splits[s]) for s in ("train", "validation", "test")] == [3902, 558, 1114]
    assert set(t.splits["train"].column_names) == {"text", "label"}


def test_subset_is_seeded_and_stratified():
    ds = load_task("sms_spam").splits["train"]
    a, b, c = subset(ds, 300, 0), subset(ds, 300, 0), subset(ds, 300, 1)
    assert len(a) == 300 and a["text"] == b["text"] and a["text"] != c["text"]
    share = np.mean(ds["label"])
    assert abs(np.mean(a["label"]) - share) < 1 / 300 + 1e-9


def test_local_file_with_named_columns_and_string_labels(tmp_path):
    rows = [{"review": f"text {i}", "stars": ["bad", "good"][i % 2]} for i in range(50)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    t = load_task(path, text_column="review", label_column="stars")
    assert t.labels == ("bad", "good") and sum(len(s) for s in t.splits.values()) == 50
    assert set(t.splits["test"]["label"]) <= {0, 1}


@pytest.mark.parametrize("ext,sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, ext, sep):
    path = tmp_path / f"d{ext}"
    path.write_text(f"text{sep}label\n" + "".join(f"row {i}{sep}{i % 3}\n" for i in range(30)))
    t = load_task(str(path))
    assert t.num_labels == 3


def test_missing_column_names_the_columns_and_the_flag(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"sentence": "x", "label": 0}] * 20)
    with pytest.raises(PeftlabError, match="no column 'text'.*sentence.*--text-column"):
        load_task(path)


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(PeftlabError, match="is empty"):
        load_task(str(tmp_path / "e.jsonl"))


def test_builtin_label_out_of_range(tmp_path, monkeypatch):
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / "sst2" / f"{split}.jsonl", [{"text": "fine", "label": 1}, {"text": "odd", "label": 7}])
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path))
    with pytest.raises(PeftlabError, match="label 7 is out of range.*0..1"):
        load_task("sst2")


def test_label_unseen_in_train(tmp_path):
    write_jsonl(tmp_path / "t" / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    write_jsonl(tmp_path / "t" / "validation.jsonl", [{"text": "a", "label": "x"}])
    write_jsonl(tmp_path / "t" / "test.jsonl", [{"text": "a", "label": "z"}])
    with pytest.raises(PeftlabError, match="never occur in train"):
        load_task(str(tmp_path / "t"))


def test_unknown_task_lists_builtins():
    with pytest.raises(PeftlabError, match="unknown task 'sst3'.*sst2.*cola.*sms_spam.*amazon_reviews"):
        load_task("sst3")
    assert set(TASKS) == {"sst2", "cola", "sms_spam", "amazon_reviews"}


def test_batches_cover_every_example_once_and_bucket_by_length():
    lengths = np.random.default_rng(0).integers(1, 100, size=1000)
    for shuffle in (True, False):
        batches = batch_indices(lengths, 16, shuffle=shuffle, seed=3)
        assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    bucketed = batch_indices(lengths, 16, shuffle=True, seed=3)
    plain = batch_indices(lengths, 16, shuffle=True, seed=3, bucket=False)
    pad = lambda bs: sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs)
    assert pad(bucketed) < 0.2 * pad(plain)


def test_eval_batches_cap_padded_tokens_on_a_long_tail():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 30, size=950), rng.integers(100, 300, size=50)])  # SMS-like tail
    batches = eval_batches(lengths, 64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    budget = 64 * lengths.mean()
    assert all(len(b) <= 64 and (len(b) == 1 or len(b) * lengths[b].max() <= budget) for b in batches)
    padded = lambda bs: sum(lengths[b].max() * len(b) for b in bs)
    sorted_rows = batch_indices(lengths, 64, shuffle=False)  # 64 rows each, longest first
    assert padded(batches) < 1.1 * lengths.sum() < 0.85 * padded(sorted_rows)  # 28,507 vs 36,016 slots
    assert [b.tolist() for b in eval_batches(lengths[:100], 64, bucket=False)] == [list(range(64)), list(range(64, 100))]
    assert eval_batches(np.array([], dtype=np.int64), 8) == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_on_the_given_side(side):
    enc = Encoded([[5, 6, 7], [8]], np.array([0, 1]))
    b = collate(enc, np.array([0, 1]), pad_id=0, side=side)
    want = [[5, 6, 7], [0, 0, 8]] if side == "left" else [[5, 6, 7], [8, 0, 0]]
    assert b["input_ids"].tolist() == want
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1] if side == "left" else [1, 0, 0]]


def test_truncation_keeps_the_end_for_causal_models():
    tok = load_backbone("tiny-llama").tokenizer
    with pytest.warns(UserWarning, match="1 of 2 data texts are longer than 4 tokens"):
        enc = encode(["one two three four five six seven", "hi"], [0, 1], tok, max_length=4)
    full = tok("one two three four five six seven")["input_ids"]
    assert enc.input_ids[0] == full[-4:] and enc.truncated == 1


def test_truncation_keeps_an_encoders_special_tokens():
    tok = load_backbone("tiny-bert").tokenizer
    with pytest.warns(UserWarning, match="1 of 1 data texts"):
        enc = encode(["one two three four five six seven"], [0], tok, max_length=6)
    assert tok.convert_ids_to_tokens(enc.input_ids[0]) == ["[CLS]", "one", "two", "three", "four", "[SEP]"]
