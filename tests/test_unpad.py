"""No work on padding (`unpad.last_hidden`): the body on a batch's real tokens only must give the
padded forward's outputs and gradients, for every architecture, padding side and method that
takes it, and leave the rest (prefixes, little padding) padded."""

import pytest
import torch

from peftlab import pooled, unpad
from peftlab.generation import collate_pairs, encode_pairs, lm_loss
from peftlab.heads import Classifier, LanguageModel
from peftlab.models import load_backbone
from peftlab.speed import fp32_attention
from peftlab.virtual import rows_by_index
from tests.conftest import adapted

DEFAULT_FLOOR = unpad.MIN_PADDING


def padded_batch(tokenizer, rows: int = 4, width: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with 0, 3, 5 and 8 pads on the tokenizer's padding side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate([0, 3, 5, 8][:rows]):
        if n:
            mask[i, slice(0, n) if tokenizer.padding_side == "left" else slice(width - n, width)] = 0
    return ids, mask


def outputs_and_grads(m, ids, mask, monkeypatch, unpadded: bool):
    """m's outputs and trained gradients on one batch, run unpadded or padded; and how many
    attention calls went through the grid."""
    calls = []
    real = unpad._attention
    monkeypatch.setattr(unpad, "_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    unpad._register.cache_clear()  # register the spy
    monkeypatch.setattr(pooled, "ENABLED", False)  # every layer on the grid (the pooled last block: test_pooled)
    monkeypatch.setattr(unpad, "MIN_PADDING", 0.0 if unpadded else float("inf"))
    m.zero_grad()
    out = m(ids, mask)
    out.float().square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters() if p.requires_grad and p.grad is not None]
    unpad._register.cache_clear()
    monkeypatch.setattr(unpad, "_attention", real)
    return out.detach(), grads, len(calls)


def assert_same(a, b, tol: float) -> None:
    (out_a, grads_a, _), (out_b, grads_b, _) = a, b
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=tol)
    assert len(grads_a) == len(grads_b) > 0
    for g, r in zip(grads_a, grads_b):
        assert torch.allclose(g, r, rtol=0, atol=tol * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("name,method", [("tiny-llama", None), ("tiny-llama", "lora"), ("tiny-llama", "prompt"),
                                         ("tiny-llama", "prefix"), ("tiny-llama", "prompt+prefix"),
                                         ("tiny-llama", "adapter"), ("tiny-gpt2", "lora"), ("tiny-gpt2", "full"),
                                         ("tiny-gpt2", "prefix"), ("tiny-bert", "lora"), ("tiny-bert", "prefix")])
def test_unpadded_equals_padded(name, method, monkeypatch):
    """Outputs and gradients as padded (fp32 to 1e-5; under bf16 autocast with fp32 attention, as
    training runs, to bf16 rounding), for left-padded causal LMs, a right-padded encoder, soft
    prompts, prefixes (keys and values every row sees before its own) and adapters; the grid ran
    once per layer and the model's attention setting is back."""
    b, m, _ = adapted(name, method)
    if method == "lora":  # B starts at zero: give the adapters something to pass on
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    layers = b.arch.body.config.num_hidden_layers
    ids, mask = padded_batch(b.tokenizer)
    padded = outputs_and_grads(m, ids, mask, monkeypatch, unpadded=False)
    unpadded = outputs_and_grads(m, ids, mask, monkeypatch, unpadded=True)
    assert padded[2] == 0 and unpadded[2] == layers
    assert_same(unpadded, padded, 1e-5)
    assert b.arch.body.config._attn_implementation == "sdpa"
    with fp32_attention([m]), torch.autocast("cpu", dtype=torch.bfloat16):
        padded = outputs_and_grads(m, ids, mask, monkeypatch, unpadded=False)
        unpadded = outputs_and_grads(m, ids, mask, monkeypatch, unpadded=True)
        assert unpadded[2] == layers
        assert_same(unpadded, padded, 2e-2)


def test_a_causal_lm_run_bidirectionally_attends_within_each_row(monkeypatch):
    b = load_backbone("tiny-llama")
    torch.manual_seed(0)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer, bidirectional=True).eval()
    ids, mask = padded_batch(b.tokenizer)
    padded = outputs_and_grads(m, ids, mask, monkeypatch, unpadded=False)
    unpadded = outputs_and_grads(m, ids, mask, monkeypatch, unpadded=True)
    assert unpadded[2] == b.arch.body.config.num_hidden_layers
    assert_same(unpadded, padded, 1e-5)


def test_generation_training_loss_is_the_same_unpadded(monkeypatch):
    b = load_backbone("tiny-llama")
    m = LanguageModel(b.arch, b.tokenizer).eval()
    pairs = encode_pairs(["the cat sat on the mat and then some more", "hi"], ["mat", "there you are"],
                         b.tokenizer, "Story: {text}\nAnswer:", 64)
    batch = collate_pairs(pairs, [0, 1], b.tokenizer.pad_token_id)
    losses = []
    for floor in (float("inf"), 0.0):
        monkeypatch.setattr(unpad, "MIN_PADDING", floor)
        losses.append(lm_loss(m, batch))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)


def test_routed_rows_full_rows_and_little_padding_stay_padded(monkeypatch):
    """Rows routed by their index in the batch (per-task LoRA adapters) run padded; so do batches
    with less padding than MIN_PADDING of their real tokens (the scatters would cost more)."""
    b, m, _ = adapted("tiny-llama", "lora")
    ids, mask = padded_batch(b.tokenizer)
    with rows_by_index():
        assert outputs_and_grads(m, ids, mask, monkeypatch, unpadded=True)[2] == 0
    full = torch.ones_like(ids)
    assert outputs_and_grads(m, ids, full, monkeypatch, unpadded=True)[2] == 0
    one_pad = full.clone()
    one_pad[0, 0] = 0  # 1 pad for 35 real tokens
    monkeypatch.setattr(unpad, "MIN_PADDING", DEFAULT_FLOOR)
    calls = []
    real = unpad._attention
    monkeypatch.setattr(unpad, "_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    unpad._register.cache_clear()
    m(ids, one_pad)
    assert not calls  # the default floor: padded
    unpad._register.cache_clear()
