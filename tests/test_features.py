import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from peftlab import unpad
from peftlab.features import POOLED, build_cache, cache_key, cut_point, logits_from_cache
from peftlab.run import prepare, train_run
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs
from tests.conftest import adapted


@pytest.mark.parametrize("name,spec,want", [
    ("tiny-llama", "head", POOLED), ("tiny-llama", "last-1", 1), ("tiny-gpt2", "last-block+norm", 1),
    ("tiny-bert", "last-1", 1), ("tiny-llama", "lora", None), ("tiny-llama", "prompt", None),
    ("tiny-llama", "full", None), ("tiny-llama", "first-1", None), ("tiny-gpt2", "bias", None),
    ("tiny-llama", "adapter", None), ("tiny-bert", "adapter", None),  # hooked onto frozen blocks from outside
])
def test_cut_point_is_where_the_frozen_bottom_ends(name, spec, want):
    _, m, _ = adapted(name, spec)
    assert cut_point(m) == want


@pytest.mark.parametrize("name,spec", [("tiny-llama", "head"), ("tiny-llama", "last-1"),
                                       ("tiny-gpt2", "last-block+norm"), ("tiny-bert", "last-1")])
@pytest.mark.parametrize("unpadded", [True, False])
def test_logits_from_the_cache_equal_the_full_forward(name, spec, unpadded, toy_task, monkeypatch):
    """Also with every padded batch run on its real tokens only (`unpad`), and with none."""
    monkeypatch.setattr(unpad, "MIN_PADDING", 0.0 if unpadded else float("inf"))
    p = prepare(RunConfig(model=name, task=toy_task, method=spec, eval_limit=40))
    tok, enc = p.backbone.tokenizer, p.data["test"]
    cache = build_cache(p.model, enc, tok, cut_point(p.model), batch_size=16, progress=False)
    from peftlab.batching import collate

    idx = torch.arange(len(enc)).numpy()[::3]
    b = collate(enc, idx, tok.pad_token_id, tok.padding_side)
    p.model.eval()
    with torch.no_grad():
        want = p.model(b["input_ids"], b["attention_mask"])
        got = logits_from_cache(p.model, cache, idx, tok.padding_side)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,spec,precision", [
    ("tiny-llama", "last-1", "fp32"), ("tiny-gpt2", "head", "fp32"), ("tiny-bert", "last-1", "fp32"),
    ("tiny-llama", "last-1", "bf16"), ("tiny-gpt2", "head", "bf16")])  # bf16: features made as its epochs make them
def test_training_from_the_cache_equals_training_end_to_end(name, spec, precision, toy_task, tmp_path):
    def run(cache: str):
        cfg = RunConfig(model=name, task=toy_task, method=spec, out=str(tmp_path / cache), train_limit=120,
                        eval_limit=60, cache_features=cache,
                        train=TrainArgs(epochs=2, batch_size=16, lr=1e-3, precision=precision))
        r = train_run(cfg, progress=False)
        return r, load_file(str(tmp_path / cache / "trainable.safetensors"))
    (r_cached, w_cached), (r_e2e, w_e2e) = run("auto"), run("off")
    assert r_cached["cached_features"] is not None and r_e2e["cached_features"] is None
    assert w_cached.keys() == w_e2e.keys()
    for k in w_cached:
        torch.testing.assert_close(w_cached[k], w_e2e[k], atol=1e-4, rtol=1e-4)
    assert r_cached["test"]["accuracy"] == pytest.approx(r_e2e["test"]["accuracy"], abs=1 / 60 + 1e-9)


def test_the_cache_is_keyed_by_model_data_and_pooling(toy_task, feature_cache_in_tmp):
    cfg = RunConfig(model="tiny-llama", task=toy_task, method="head", eval_limit=20)
    p = prepare(cfg)
    tok, enc, point = p.backbone.tokenizer, p.data["test"], POOLED
    key = cache_key(p.model, enc, tok, point)
    assert cache_key(p.model, enc, tok, point) == key  # deterministic
    p.model.bidirectional = True  # the same model read without its causal mask: other features
    assert cache_key(p.model, enc, tok, point) != key
    p.model.bidirectional = False
    # bf16 features are keyed apart; fp32 keys are those of versions before the precision existed
    assert cache_key(p.model, enc, tok, point, precision="bf16") != key == cache_key(p.model, enc, tok, point,
                                                                                      precision="fp32")
    first = build_cache(p.model, enc, tok, point, progress=False)
    assert list(feature_cache_in_tmp.glob("*.safetensors")) == [feature_cache_in_tmp / f"{key}.safetensors"]
    # a second build reads the file: the model is never run
    calls = []
    hook = p.model.body.register_forward_hook(lambda *a: calls.append(1))
    again = build_cache(p.model, enc, tok, point, progress=False)
    hook.remove()
    assert not calls and torch.equal(again.hidden, first.hidden)
    # data, pooling, cut point and weights each change the key
    other_data = dataclasses.replace(enc, input_ids=[x[:-1] or x for x in enc.input_ids])
    assert cache_key(p.model, other_data, tok, point) != key
    p.model.pooling = "mean"
    assert cache_key(p.model, enc, tok, point) != key
    p.model.pooling = "last"
    assert cache_key(p.model, enc, tok, point) == key and cache_key(p.model, enc, tok, 1) != key
    with torch.no_grad():
        p.model.body.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert cache_key(p.model, enc, tok, point) != key
    # weights above the cut do not matter to a block cache; those below do
    k1 = cache_key(p.model, enc, tok, 1)
    with torch.no_grad():
        p.model.body.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert cache_key(p.model, enc, tok, 1) == k1


def test_a_multitask_run_reuses_each_tasks_cache(task_pair, tmp_path, feature_cache_in_tmp):
    for t in task_pair:
        train_run(RunConfig(model="tiny-llama", task=t, method="head", out=str(tmp_path / t.rsplit("/", 1)[-1] / "run"),
                            train=TrainArgs(epochs=1)), progress=False)
    files = sorted(feature_cache_in_tmp.glob("*.safetensors"))
    assert len(files) == 6  # two tasks x three splits
    r = train_run(RunConfig(model="tiny-llama", task=",".join(task_pair), method="head", out=str(tmp_path / "mt"),
                            train=TrainArgs(epochs=1)), progress=False)
    assert sorted(feature_cache_in_tmp.glob("*.safetensors")) == files and r["cached_features"]["cut"] == POOLED
    # the joined cache routes each row right: the same test metrics as from tokens
    off = train_run(RunConfig(model="tiny-llama", task=",".join(task_pair), method="head", out=str(tmp_path / "off"),
                              cache_features="off", train=TrainArgs(epochs=1)), progress=False)
    assert r["test"] == pytest.approx(off["test"], abs=1e-6)
