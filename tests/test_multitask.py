import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftlab import virtual
from peftlab.batching import Encoded
from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.multitask import TaskPrompts, plan_batches, task_weights
from peftlab.run import prepare, train_run
from peftlab.runconfig import RunConfig
from peftlab.saved import load_run
from peftlab.train import TrainArgs


def cfg_for(task_pair, tmp_path, **kw) -> RunConfig:
    train = kw.pop("train", TrainArgs(epochs=3, batch_size=16, lr=3e-3))
    return RunConfig(model=kw.pop("model", "tiny-llama"), task=",".join(task_pair), out=str(tmp_path / kw.pop("out", "mt")),
                     train=train, **kw)


def test_each_row_goes_to_its_own_head(task_pair):
    p = prepare(RunConfig(model="tiny-llama", task=",".join(task_pair), method="head"))
    m, enc, tok = p.model, p.data["train"], p.backbone.tokenizer
    assert list(m.head) == ["fruit", "colour"] and m.num_labels == [2, 3]
    from peftlab.batching import collate

    idx = np.r_[0:3, len(enc) - 3:len(enc)]  # three fruit rows, three colour rows
    b = collate(enc, idx, tok.pad_token_id, tok.padding_side)
    tasks = torch.as_tensor(enc.task_ids[idx])
    logits = m(b["input_ids"], b["attention_mask"], tasks)
    feats = m.features(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(logits[:3, :2], m.head["fruit"](feats[:3]))
    torch.testing.assert_close(logits[3:], m.head["colour"](feats[3:]))
    assert (logits[:3, 2] == torch.finfo(logits.dtype).min).all()  # a 2-label task never picks label 3
    # the loss of fruit rows reaches the fruit head only
    F.cross_entropy(logits[:3], b["labels"][:3]).backward()
    assert m.head["fruit"].weight.grad.abs().sum() > 0 and not m.head["colour"].weight.grad.any()


def test_joint_training_improves_both_tasks(task_pair, tmp_path):
    r = train_run(cfg_for(task_pair, tmp_path, method="last-1", freeze=None), progress=False)
    assert r["kind"] == "multitask" and r["tasks"] == {"fruit": "accuracy", "colour": "accuracy"}
    start, end = r["initial_validation"], r["test"]
    for t in ("fruit", "colour"):
        assert end[f"{t}/accuracy"] >= 0.85 and end[f"{t}/accuracy"] > start[f"{t}/accuracy"] + 0.2, (start, end)
    assert end["combined"] == pytest.approx((end["fruit/accuracy"] + end["colour/accuracy"]) / 2)
    assert r["cached_features"]["cut"] == 1  # blocks below the last one ran once


def test_a_frozen_head_keeps_its_weights_and_a_transfer_adds_a_task(task_pair, tmp_path):
    fruit, colour = task_pair
    src = train_run(RunConfig(model="tiny-llama", task=fruit, method="lora", out=str(tmp_path / "src"),
                              train=TrainArgs(epochs=4, batch_size=16, lr=5e-3)), progress=False)
    assert src["test"]["accuracy"] >= 0.85
    before = load_file(str(tmp_path / "src" / "trainable.safetensors"))
    cfg = cfg_for(task_pair, tmp_path, method="lora", freeze="backbone,head:fruit", init_from=str(tmp_path / "src"),
                  out="tr")
    r = train_run(cfg, progress=False)
    after = load_file(str(tmp_path / "tr" / "trainable.safetensors"))
    torch.testing.assert_close(after["head.fruit.weight"], before["head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(after["head.fruit.bias"], before["head.bias"], rtol=0, atol=0)
    assert r["initial_validation"]["fruit/accuracy"] >= 0.85  # the transferred head works from the start
    assert r["test"]["fruit/accuracy"] >= 0.8 and r["test"]["colour/accuracy"] >= 0.8, r["test"]
    # the run reloads on its own (the transferred head was saved with it)
    _, p = load_run(tmp_path / "tr")
    torch.testing.assert_close(p.model.head["fruit"].weight, before["head.weight"])
    assert not p.model.head["fruit"].weight.requires_grad


def test_frozen_network_trains_one_soft_prompt_per_task(task_pair, tmp_path, monkeypatch):
    cfg = cfg_for(task_pair, tmp_path, method="prompt", head="label-words", freeze="network",
                  train=TrainArgs(epochs=1, batch_size=16, lr=1e-2), train_limit=40, eval_limit=30)
    p = prepare(cfg)
    assert isinstance(p.model.prompt, TaskPrompts)
    assert sorted(p.trainable) == ["prompt.prompts.colour.embedding.weight", "prompt.prompts.fruit.embedding.weight"]
    with torch.no_grad():  # make the two prompts differ, then a mixed batch equals each task alone
        p.model.prompt.prompts["colour"].embedding.weight.mul_(-1)
    from peftlab.batching import collate

    enc, tok = p.data["test"], p.backbone.tokenizer
    idx = np.r_[0:2, len(enc) - 2:len(enc)]
    b = collate(enc, idx, tok.pad_token_id, tok.padding_side)
    tasks = torch.as_tensor(enc.task_ids[idx])
    mixed = p.model(b["input_ids"], b["attention_mask"], tasks)
    for rows in (slice(0, 2), slice(2, 4)):
        alone = collate(enc, idx[rows], tok.pad_token_id, tok.padding_side)
        want = p.model(alone["input_ids"], alone["attention_mask"], tasks[rows])
        torch.testing.assert_close(mixed[rows][:, :want.shape[1]], want, atol=1e-5, rtol=1e-5)
        with monkeypatch.context() as m:  # one task's rows compute its prompt once: as every row running it
            m.setattr(virtual, "shares_rows", lambda *a: False)
            torch.testing.assert_close(p.model(alone["input_ids"], alone["attention_mask"], tasks[rows]), want,
                                       atol=1e-5, rtol=1e-5)
    r = train_run(cfg, progress=False)
    assert r["trainable_params"] == 2 * 20 * p.model.arch.hidden_size


@pytest.mark.parametrize("freeze,method,message", [
    ("backbone", "full", "trains pretrained weights"), ("network", "lora", "only soft prompts"),
    ("head:nope", "head", "no task 'nope'"), ("brain", "head", "unknown"),
])
def test_freeze_policies_that_contradict_the_method_fail_clearly(task_pair, freeze, method, message):
    with pytest.raises(PeftlabError, match=message):
        prepare(RunConfig(model="tiny-llama", task=",".join(task_pair), method=method, freeze=freeze))


def test_samplers_draw_tasks_as_asked():
    enc = Encoded([[1]] * 900 + [[1]] * 100, np.zeros(1000, dtype=np.int64),
                  task_ids=np.r_[np.zeros(900, dtype=np.int64), np.ones(100, dtype=np.int64)])

    def share(sampler, t=2.0):
        batches = plan_batches(enc, 10, sampler=sampler, temperature=t, seed=0)
        assert len(batches) == 100 and all(len(set(enc.task_ids[b])) == 1 for b in batches)
        return np.mean([enc.task_ids[b[0]] == 1 for b in batches])
    batches = plan_batches(enc, 10, sampler="proportional", temperature=1, seed=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))  # every row once
    assert share("uniform") == pytest.approx(0.5, abs=0.12)
    assert share("temperature", 2.0) == pytest.approx(task_weights([900, 100], "temperature", 2.0)[1], abs=0.1)
    assert task_weights([900, 100], "temperature", 2.0)[1] == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_bidirectional_attention_sees_later_tokens(name):
    from peftlab.heads import Classifier
    from peftlab.models import load_backbone

    b = load_backbone(name)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])
    mask = torch.ones_like(ids)
    causal = Classifier(b.arch, 2, "first", b.tokenizer)
    both = Classifier(b.arch, 2, "auto", b.tokenizer, bidirectional=True)
    assert both.pooling == "first"
    with torch.no_grad():
        c, d = causal.features(ids, mask), both.features(ids, mask)
    torch.testing.assert_close(c[0], c[1])  # causal: the first token never sees the last
    assert (d[0] - d[1]).abs().max() > 1e-4
    # a padded row gives what it gives alone
    padded = torch.tensor([[0, 5, 6, 7]]) if b.tokenizer.padding_side == "left" else torch.tensor([[5, 6, 7, 0]])
    pmask = (padded != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(both.features(padded, pmask), both.features(torch.tensor([[5, 6, 7]]),
                                                                                 torch.ones(1, 3, dtype=torch.long)),
                                   atol=1e-5, rtol=1e-5)


def test_cli_trains_a_multitask_run(task_pair, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--model", "tiny-llama", "--task", ",".join(task_pair), "--method", "head",
                 "--freeze", "backbone", "--sampler", "uniform", "--epochs", "2", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "fruit/accuracy" in shown and "colour/accuracy" in shown and "combined" in shown
    assert main(["eval", str(out)]) == 0
    assert "combined" in capsys.readouterr().out


def test_per_task_lora_adapters_route_rows_and_train(task_pair, tmp_path):
    cfg = cfg_for(task_pair, tmp_path, method="lora", per_task_adapters=True, freeze="backbone")
    p = prepare(cfg)
    lora = [n for n in p.trainable if ".lora_" in n]
    assert lora and all(".fruit." in n or ".colour." in n for n in lora)
    assert sum(".fruit." in n for n in lora) == sum(".colour." in n for n in lora)
    with torch.no_grad():  # B starts at zero: make both tasks' adapters act, and differ
        for n, t in p.model.named_parameters():
            if ".lora_B." in n:
                t.normal_(0, 0.5)
    from peftlab.batching import collate

    enc, tok = p.data["test"], p.backbone.tokenizer
    idx = np.r_[0:2, len(enc) - 2:len(enc)]
    b = collate(enc, idx, tok.pad_token_id, tok.padding_side)
    tasks = torch.as_tensor(enc.task_ids[idx])
    mixed = p.model(b["input_ids"], b["attention_mask"], tasks)
    from peftlab.methods.lora import per_row

    feats_base = p.model.features(b["input_ids"], b["attention_mask"])  # no routing: the base model
    for task, rows, n in (("fruit", slice(0, 2), 2), ("colour", slice(2, 4), 3)):
        with per_row(p.model, [task] * 4):  # every row through this task's adapter alone
            alone = p.model.head[task](p.model.features(b["input_ids"], b["attention_mask"])[rows])
        torch.testing.assert_close(mixed[rows, :n], alone, atol=1e-5, rtol=1e-5)  # each row took its own
        assert (mixed[rows, :n] - p.model.head[task](feats_base[rows])).abs().max() > 1e-3  # not the base
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "pta"), train=TrainArgs(epochs=4, batch_size=16, lr=1e-2))
    r = train_run(cfg, progress=False)
    assert r["test"]["fruit/accuracy"] >= 0.8 and r["test"]["colour/accuracy"] >= 0.8, r["test"]


def test_per_task_parts_refuse_export_and_merge(task_pair, tmp_path):
    from peftlab.export import export_adapter, merge_run

    cfg = cfg_for(task_pair, tmp_path, method="lora", per_task_adapters=True, train_limit=30, eval_limit=20,
                  train=TrainArgs(epochs=1, batch_size=16))
    train_run(cfg, progress=False)
    for f in (export_adapter, merge_run):
        with pytest.raises(PeftlabError, match="one adapter or soft prompt per task"):
            f(tmp_path / "mt", tmp_path / "x")


def test_a_new_task_trains_alone_when_the_rest_is_frozen(task_pair, tmp_path):
    """Transfer: add a task to a finished run, keep the backbone and the old head frozen."""
    fruit, colour = task_pair
    src = train_run(RunConfig(model="tiny-llama", task=fruit, method="head", out=str(tmp_path / "src"),
                              train=TrainArgs(epochs=1)), progress=False)
    cfg = cfg_for(task_pair, tmp_path, method="head", freeze="backbone,head:fruit", init_from=str(tmp_path / "src"),
                  out="add", train=TrainArgs(epochs=2, batch_size=16))
    p = prepare(cfg)
    from peftlab.multitask import learning_tasks

    assert learning_tasks(p.model, p.trainable) == [1]  # fruit's batches would teach nothing
    r = train_run(cfg, progress=False)
    assert r["test"]["fruit/accuracy"] == pytest.approx(src["test"]["accuracy"])  # untouched: the same answers
    before = load_file(str(tmp_path / "src" / "trainable.safetensors"))
    after = load_file(str(tmp_path / "add" / "trainable.safetensors"))
    assert torch.equal(after["head.fruit.weight"], before["head.weight"])


def test_task_prompts_follow_rows_repeated_per_label():
    from peftlab.methods.prompt import SoftPrompt

    tp = TaskPrompts(SoftPrompt(3, torch.randn(3, 4)), ["a", "b"])
    with torch.no_grad():
        tp.prompts["b"].embedding.weight.add_(1.0)
    tp.route = torch.tensor([1, 0])
    out = tp(6)  # two rows, three labels each (as multi-token label words score them)
    assert out.shape == (6, 3, 4)
    for i, task in enumerate(["b", "b", "b", "a", "a", "a"]):
        assert torch.equal(out[i], tp.prompts[task].embedding.weight)
    with pytest.raises(PeftlabError, match="each row's task"):
        tp(5)
