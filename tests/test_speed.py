"""Fast defaults must not change results: allocator tuning, precision, length bucketing."""

import contextlib

import numpy as np
import pytest
import torch

from peftlab.batching import encode
from peftlab.errors import PeftlabError
from peftlab.models import load_backbone
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.speed import autocast, cpu_has_bf16, resolve, tune_allocator
from peftlab.train import TrainArgs, logits_fn, predict
from tests.conftest import adapted


def test_the_allocator_is_tuned_on_glibc_unless_asked_not_to(monkeypatch):
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert tune_allocator() is True  # every mallopt call accepted
    tune_allocator.cache_clear()
    monkeypatch.setenv("PEFTLAB_DEFAULT_MALLOC", "1")
    assert tune_allocator() is False
    tune_allocator.cache_clear()  # the process's allocator stays tuned: mallopt was not undone


def test_peak_memory_sees_a_tensor_in_the_live_heap_and_in_rss():
    import time

    from peftlab.measure import PeakMemory, live_heap_bytes

    if live_heap_bytes() is None:
        pytest.skip("glibc >= 2.33 only")
    with PeakMemory(interval=0.005, live=True) as mem:
        start = live_heap_bytes() / 2**20
        x = torch.ones(64 * 2**18)  # 64 MiB, written: resident
        time.sleep(0.05)
        del x
    assert 60 < mem.live_mb - start < 80, (mem.live_mb, start)
    assert mem.rise_mb > 60
    assert PeakMemory().live_mb is None  # opt-in: each read holds the heap's lock


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_bf16():
    assert resolve("auto") == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve("fp32") == "fp32" and resolve("bf16") == "bf16"
    with pytest.raises(PeftlabError, match="--precision 'fp16' is unknown; valid: auto, bf16, fp32"):
        resolve("fp16")
    with pytest.raises(PeftlabError, match="'precision' must be one of 'auto', 'bf16', 'fp32', got 'fp8'"):
        TrainArgs(precision="fp8")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_bucketing_gives_the_same_predictions_as_no_bucketing(name):
    b, m, _ = adapted(name, "lora")
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "music", "paper", "light"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 30, size=40)]
    enc = encode(texts, [0] * 40, b.tokenizer, 64, "test")
    fn = logits_fn(m, enc, b.tokenizer.pad_token_id, b.tokenizer.padding_side)
    bucketed, _ = predict(m, enc, fn, batch_size=8, bucket=True)
    plain, _ = predict(m, enc, fn, batch_size=8, bucket=False)
    np.testing.assert_allclose(bucketed, plain, atol=1e-5, rtol=1e-5)  # each row as itself, whatever its batch


def test_bf16_training_reaches_fp32_quality_on_a_toy_task(toy_task, tmp_path):
    def run(precision):
        cfg = RunConfig(model="tiny-llama", task=toy_task, method="full", out=str(tmp_path / precision),
                        train=TrainArgs(epochs=4, batch_size=16, lr=3e-3, precision=precision))
        return train_run(cfg, progress=False)["test"]["accuracy"]
    fp32, bf16 = run("fp32"), run("bf16")
    assert fp32 >= 0.95 and abs(bf16 - fp32) <= 0.02, (fp32, bf16)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_bf16_weight_copies_change_nothing_but_speed(name):
    """Frozen weights cast once (speed.bf16_weights) give bitwise the outputs and gradients that
    autocast's per-forward casts give; fp32 paths inside still read the fp32 weights."""
    from peftlab.speed import bf16_weights, casts_once

    b, m, _ = adapted(name, "lora")
    with torch.no_grad():  # B away from its zero init, or A's gradients are zeros on both sides
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ids = torch.randint(5, 90, (3, 7))
    mask = torch.ones_like(ids)
    lora = [p for p in m.parameters() if p.requires_grad]  # A, B and the head

    def step():
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids, mask)
        out.float().square().sum().backward()
        return out.detach(), [p.grad.clone() for p in lora]

    ref_out, ref_grads = step()
    assert all(g.abs().sum() > 0 for g in ref_grads)  # the gradients flowed through the frozen layers
    ref_fp32 = m(ids, mask).detach()
    with bf16_weights([m], "bf16") as n:
        frozen = [mod for mod in m.modules() if casts_once(mod)]
        assert n == len(frozen) >= 4  # every frozen projection (q, k, v, o, MLP... or c_attn, c_fc...)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            m(ids, mask)  # copies made while evaluating must serve the training step after it
        out, grads = step()
        assert torch.equal(out, ref_out) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
        assert torch.equal(m(ids, mask).detach(), ref_fp32)  # outside autocast: the fp32 weights
    assert not [mod for mod in m.modules() if casts_once(mod)]
    with bf16_weights([m], "bf16", frozen_only=False) as n_all:  # decoding: trained projections too
        assert n_all > n
    with bf16_weights([m], "fp32") as n:
        assert n == 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_prepacked_copies_change_no_output(name):
    """With `pack` (decoding) calls that record no gradients read weights prepacked for oneDNN
    where the CPU has it: bitwise the outputs of autocast's casts (Linear with and without bias,
    GPT-2's Conv1D); calls that do record gradients read the plain copies."""
    from torch.profiler import profile

    from peftlab.speed import _onednn_packing, bf16_weights

    b, m, _ = adapted(name, "lora")
    with torch.no_grad():  # biases start at 0: give them values, so that a dropped bias shows
        for mod in m.modules():
            if isinstance(getattr(mod, "bias", None), torch.Tensor):
                mod.bias.normal_()
    ids = torch.randint(5, 90, (3, 7))
    mask = torch.ones_like(ids)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.inference_mode(), bf16():
        ref = m(ids, mask)
    with bf16_weights([m], "bf16", frozen_only=False, pack=True) as n:
        with torch.inference_mode(), bf16(), profile() as prof:
            out = m(ids, mask)
        with bf16():
            recorded = m(ids, mask)
    packed = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert (packed > 0) == _onednn_packing() and n >= 4
    assert torch.equal(out, ref) and torch.equal(recorded.detach(), ref) and recorded.requires_grad


@pytest.mark.parametrize("name,spec", [("tiny-llama", "lora"), ("tiny-gpt2", "last-1")])
def test_bf16_evaluation_casts_each_weight_once_and_changes_no_logit(name, spec, monkeypatch):
    """predict under bf16 reads one bf16 copy per projection for the whole call (LoRA merged
    first), and its logits are bitwise those of plain autocast, which casts every batch."""
    import peftlab.methods.lora
    from peftlab.speed import casts_once

    b, m, _ = adapted(name, spec)
    with torch.no_grad():  # a trained-looking adapter: merging it must change the weights
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    enc = encode([f"apple river {'stone ' * n}" for n in range(24)], [n % 2 for n in range(24)], b.tokenizer, 64, "test")
    fn = logits_fn(m, enc, b.tokenizer.pad_token_id, b.tokenizer.padding_side)
    swapped = []
    real = peftlab.methods.lora.bf16_weights

    @contextlib.contextmanager
    def spy(*a, **k):
        with real(*a, **k) as n:
            swapped.append((k.get("frozen_only"), n, sum(casts_once(mod) for mod in m.modules())))
            yield n
    monkeypatch.setattr(peftlab.methods.lora, "bf16_weights", spy)
    fast, _ = predict(m, enc, fn, batch_size=8, precision="bf16")
    monkeypatch.setattr(peftlab.methods.lora, "bf16_weights", lambda *a, **k: contextlib.nullcontext(0))
    plain, _ = predict(m, enc, fn, batch_size=8, precision="bf16")
    [(frozen_only, n, reading_copies)] = swapped
    assert frozen_only is False and n == reading_copies >= 4 and np.array_equal(fast, plain)
    assert not [mod for mod in m.modules() if casts_once(mod)]  # the copies are gone after the call


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_generators_validation_loss_runs_lora_merged_and_follows_the_precision(name, monkeypatch):
    from peftlab.generation import encode_pairs, validation_loss
    from peftlab.methods import lora as lora_module
    from peftlab.heads import LanguageModel
    from peftlab.methods import MethodArgs, parse_method
    from peftlab.methods.lora import lora_layers

    b = load_backbone(name)
    m = LanguageModel(b.arch, b.tokenizer)
    pairs = encode_pairs([f"the cat sat on {'the ' * n}mat" for n in range(12)], ["mat"] * 12, b.tokenizer,
                         "{text} =>", 64)
    torch.manual_seed(0)
    lora = parse_method("lora", MethodArgs())
    lora.apply(m)
    for layer in lora_layers(m):  # a trained-looking adapter: B away from its zero init
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    merged, real = [], lora_module.merged_for_inference

    @contextlib.contextmanager
    def spy(model):
        with real(model) as did:
            merged.append(did)
            yield did
    monkeypatch.setattr(lora_module, "merged_for_inference", spy)
    plain = validation_loss(m, pairs, 4, b.tokenizer.pad_token_id)
    monkeypatch.setattr(lora_module, "merged_for_inference", lambda model: contextlib.nullcontext(False))
    unmerged = validation_loss(m, pairs, 4, b.tokenizer.pad_token_id)
    monkeypatch.undo()
    bf16 = validation_loss(m, pairs, 4, b.tokenizer.pad_token_id, precision="bf16")
    with lora_module.disabled(m):
        base = validation_loss(m, pairs, 4, b.tokenizer.pad_token_id)
    assert merged == [True] and plain == pytest.approx(unmerged, rel=1e-5)  # merged meanwhile: same loss
    # bf16 ran, and kept the adapter: its rounding is far below what the adapter changes
    assert bf16 != plain and abs(bf16 - plain) < 0.1 * abs(plain - base)
    assert not any(layer.merged for layer in lora_layers(m))


def test_label_words_are_scored_by_an_fp32_lm_head_under_bf16():
    from peftlab.heads import Classifier

    b = load_backbone("tiny-llama")
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=("apple", "a stone river")).eval()
    ids = torch.randint(5, 90, (3, 9))
    seen = []
    hook = b.arch.lm_head.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(ids, torch.ones_like(ids))
    hook.remove()
    assert seen and all(s == (torch.float32, torch.float32) for s in seen)


def _padded_and_not(m, precision: str):
    """A function that runs `m` forward and backward on 3 x 7 tokens padded and not (under
    `precision`'s autocast) and returns the outputs and the trained parameters' gradients."""
    ids = torch.randint(5, 90, (3, 7))
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    trained = [p for p in m.parameters() if p.requires_grad]

    def step():
        m.zero_grad()
        outs = []
        for mask in (padded, torch.ones_like(ids)):
            with autocast(precision):
                out = m(ids, mask)
            out.float().square().sum().backward()
            outs.append(out.detach())
        return outs, [p.grad.clone() for p in trained]
    return step


@pytest.mark.parametrize("name,method", [("tiny-llama", "lora"), ("tiny-llama", "prefix"), ("tiny-gpt2", "lora")])
def test_fp32_attention_under_bf16_autocast(name, method, monkeypatch):
    """speed.fp32_attention: the attention kernel gets fp32 inputs under bf16 autocast, and the
    outputs are bitwise those of the same model with SDPA upcast by hand, gradients equal to bf16
    rounding (with and without padding, grouped keys, a prefix); the model's attention setting is
    restored on exit."""
    import torch.nn.functional as F

    from peftlab.speed import fp32_attention

    b, m, _ = adapted(name, method)
    step = _padded_and_not(m, "bf16")
    real, seen = F.scaled_dot_product_attention, []

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *a, **kw)

    def upcast(q, k, v, attn_mask=None, **kw):  # the reference: bf16 inputs (as autocast), fp32 kernel by hand
        with torch.autocast("cpu", enabled=False):
            q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
            return real(q, k, v, attn_mask=attn_mask, **kw).to(torch.bfloat16)

    plain_out, _ = step()
    monkeypatch.setattr(F, "scaled_dot_product_attention", upcast)
    ref_out, ref_grads = step()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with fp32_attention([m]) as n:
        assert n == 1
        out, grads = step()
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen)
    assert all(torch.equal(o, r) for o, r in zip(out, ref_out))
    # gradients: to bf16 rounding (grouped keys sum their query heads' gradients inside the kernel,
    # transformers' repeated keys outside it: another order of the same sum)
    assert all(torch.allclose(g, r, rtol=0, atol=1e-2 * r.abs().max().item()) for g, r in zip(grads, ref_grads))
    assert not torch.equal(out[0], plain_out[0])  # bf16 attention differs: the switch did something
    assert m.arch.body.config._attn_implementation == "sdpa"


def test_fp32_attention_keeps_for_backward_what_bf16_attention_keeps():
    """Under bf16 autocast the fp32 kernel's inputs and output are kept for backward in bf16: the
    memory a forward leaves for backward is that of transformers' bf16 attention, not twice it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from peftlab.measure import live_heap_bytes
    from peftlab.speed import _fp32_sdpa

    if live_heap_bytes() is None:
        pytest.skip("glibc >= 2.33 only")
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    q = torch.randn(4, 6, 256, 64, dtype=torch.bfloat16, requires_grad=True)  # out: 768 KiB in bf16
    k, v = (torch.randn(4, 2, 256, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

    def held(attention) -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = live_heap_bytes()
            out, _ = attention(module, q, k, v, None)
            grew = live_heap_bytes() - before
        out.float().sum().backward()  # both work
        return grew

    ours, theirs = held(_fp32_sdpa), held(sdpa_attention_forward)
    assert ours <= 1.1 * theirs + 2**16, (ours, theirs)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_fp32_attention_in_fp32_keeps_grouped_keys_grouped(method, monkeypatch):
    """In fp32, speed.fp32_attention changes only how grouped keys and values reach the kernel
    where there is a mask (padding, a prefix): as they are, where transformers repeats them to
    every query head (3x the keys saved for backward on SmolLM2). Outputs and gradients equal."""
    import torch.nn.functional as F

    from peftlab.speed import fp32_attention

    b, m, _ = adapted("tiny-llama", method)
    step = _padded_and_not(m, "fp32")
    real, heads = F.scaled_dot_product_attention, []

    def spy(q, k, v, *a, **kw):
        heads.append((q.shape[1], k.shape[1], kw.get("attn_mask") is not None))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ref_out, ref_grads = step()
    assert all(q == k for q, k, masked in heads if masked)  # transformers: repeated under a mask
    heads.clear()
    with fp32_attention([m]) as n:
        assert n == 1
        out, grads = step()
    assert any(masked for _, _, masked in heads) and all(k < q for q, k, masked in heads if masked)
    assert all(torch.allclose(o, r, rtol=0, atol=1e-6) for o, r in zip(out, ref_out))
    assert all(torch.allclose(g, r, rtol=1e-5, atol=1e-6 * r.abs().max().item()) for g, r in zip(grads, ref_grads))
    assert m.arch.body.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_bf16_decoding_equals_transformers_generate_under_autocast(name):
    from peftlab.decode import generate
    from peftlab.heads import LanguageModel

    b = load_backbone(name)
    tok, m = b.tokenizer, LanguageModel(b.arch, b.tokenizer).eval()
    batch = tok(["The cat sat on the", "Hello"] * 2, padding=True, return_tensors="pt")
    ours = generate(m, batch["input_ids"], batch["attention_mask"], 10, pad_id=tok.pad_token_id, precision="bf16")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = b.model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=None)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, theirs)
