"""The last block at the pooled positions only (`pooled.hidden_at`): the same outputs and
gradients as the whole block, padded or not, for every method that takes it, under bf16 too;
and the whole block wherever the shortcut does not hold."""

import pytest
import torch

from peftlab import pooled, unpad
from peftlab.heads import Classifier
from peftlab.methods import MethodArgs, parse_method, set_trainable, trainable_names
from peftlab.methods.lora import per_row
from peftlab.models import load_backbone
from peftlab.speed import fp32_attention
from tests.conftest import adapted
from tests.test_unpad import padded_batch


def run(m, ids, mask, monkeypatch, shortcut: bool):
    """m's outputs and trained gradients on one batch, with the shortcut on or off; and how
    often the hand-run last block ran."""
    calls = []
    real = pooled._block
    monkeypatch.setattr(pooled, "_block", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(pooled, "ENABLED", shortcut)
    m.zero_grad()
    out = m(ids, mask)
    out.float().square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters() if p.requires_grad and p.grad is not None]
    return out.detach(), grads, len(calls)


def assert_same(m, ids, mask, monkeypatch, tol: float) -> None:
    (out, grads, calls), (ref, ref_grads, ref_calls) = (run(m, ids, mask, monkeypatch, s) for s in (True, False))
    assert (calls, ref_calls) == (1, 0)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert len(grads) == len(ref_grads) > 0
    # a gradient that is zero but for rounding (BERT's key bias: softmax ignores a shift shared by
    # all keys) is held to the largest one's scale
    floor = 1e-3 * max(r.norm() for r in ref_grads)
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= tol * max(r.norm(), floor), (g - r).norm() / r.norm()


def bidirectional(method: str):
    b = load_backbone("tiny-llama")
    torch.manual_seed(0)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer, bidirectional=True).eval()
    meth = parse_method(method, MethodArgs())
    meth.apply(m)
    set_trainable(m, trainable_names(m, meth))
    return b, m


METHODS = ["full", "lora", "prompt", "prefix", "prompt+prefix", "adapter", "adapter:houlsby", "ia3"]


@pytest.mark.parametrize("name,method", [*(("tiny-llama", m) for m in [*METHODS, "bidirectional"]),
                                         *(("tiny-bert", m) for m in METHODS)])
@pytest.mark.parametrize("floor", [0.0, float("inf")], ids=["unpadded", "padded"])
def test_pooled_last_block_equals_the_whole_block(name, method, floor, monkeypatch):
    """fp32 to 1e-5; under bf16 autocast with fp32 attention (as training runs) to bf16 rounding.
    Llama: left padding (SmolLM2's tokenizer), the last token pooled; bidirectional: the first.
    BERT: right padding, [CLS] pooled, no final norm. Rows with 0 to 8 pads."""
    spec, _, placement = method.partition(":")
    b, m = bidirectional("lora") if method == "bidirectional" else \
        adapted(name, spec, **({"adapter": placement} if placement else {}))[:2]
    for n, p in m.named_parameters():
        if "lora_B" in n or "adapters" in n:  # they start at zero: give them something to pass on
            torch.nn.init.normal_(p, std=0.02)
    monkeypatch.setattr(unpad, "MIN_PADDING", floor)
    ids, mask = padded_batch(b.tokenizer)
    assert_same(m, ids, mask, monkeypatch, 1e-5)
    with fp32_attention([m]), torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same(m, ids, mask, monkeypatch, 2e-2)


def test_right_padding_and_per_row_adapters_take_it(monkeypatch):
    """Right-padded rows (the last real token mid-row), and per-task LoRA adapters routed by row."""
    b, m, _ = adapted("tiny-llama", "lora")
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    b.tokenizer.padding_side = "right"
    try:
        ids, mask = padded_batch(b.tokenizer)
    finally:
        b.tokenizer.padding_side = "left"
    monkeypatch.setattr(unpad, "MIN_PADDING", 0.0)
    assert_same(m, ids, mask, monkeypatch, 1e-5)
    with per_row(m, ["default", None, "default", None]):
        assert_same(m, ids, mask, monkeypatch, 1e-5)
        mixed = run(m, ids, mask, monkeypatch, True)[0]
    every = run(m, ids, mask, monkeypatch, True)[0]
    torch.testing.assert_close(mixed[::2], every[::2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[1::2], every[1::2], atol=1e-3)  # rows 1 and 3 ran without LoRA


@pytest.mark.parametrize("case", ["gpt2", "attn-parallel", "bert-attn-parallel", "mean", "causal-first",
                                  "whole"])
def test_the_whole_block_runs_where_the_shortcut_does_not_hold(case, monkeypatch):
    """Other architectures, a parallel adapter reading attention's input (a
    hook on a module not called), mean pooling, the first token of a causal LM (it sees itself
    only) and callers reading every position (feature caches) run the block whole."""
    name, method, kw = {"gpt2": ("tiny-gpt2", "lora", {}),
                        "attn-parallel": ("tiny-llama", "adapter", {"adapter_at": "attn"}),
                        "bert-attn-parallel": ("tiny-bert", "adapter", {"adapter_at": "attn"}),
                        }.get(case, ("tiny-llama", "lora", {}))
    b, m, _ = adapted(name, method, **kw)
    m.pooling = {"mean": "mean", "causal-first": "first"}.get(case, m.pooling)
    ids, mask = padded_batch(b.tokenizer)
    if case == "whole":
        with pooled.whole_last_block():
            assert run(m, ids, mask, monkeypatch, True)[2] == 0
    else:
        assert run(m, ids, mask, monkeypatch, True)[2] == 0


def test_one_token_label_words_take_it(monkeypatch):
    b = load_backbone("tiny-llama")
    torch.manual_seed(0)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=("good", "bad")).eval()
    meth = parse_method("lora", MethodArgs())
    meth.apply(m)
    set_trainable(m, trainable_names(m, meth))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids, mask = padded_batch(b.tokenizer)
    assert_same(m, ids, mask, monkeypatch, 1e-5)
