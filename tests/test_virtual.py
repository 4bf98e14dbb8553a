import copy

import pytest
import torch

from peftlab import unpad, virtual
from peftlab.decode import generate
from peftlab.errors import PeftlabError
from peftlab.generation import collate_pairs, encode_pairs, lm_loss
from peftlab.heads import Classifier, LanguageModel
from peftlab.methods import MethodArgs, parse_method, trainable_names
from peftlab.models import load_backbone
from peftlab.speed import autocast, fp32_attention
from tests.conftest import adapted, assert_rows_pool_as_alone, fit
from tests.test_unpad import padded_batch

setup = adapted


@pytest.mark.parametrize("name,spec,kw,count", [
    ("tiny-llama", "prompt", {"virtual_tokens": 5}, 5 * 64),
    ("tiny-llama", "prefix", {"virtual_tokens": 5}, 5 * 2 * 2 * (2 * 16)),  # layers x (k,v) x kv_heads*head_dim
    ("tiny-gpt2", "prefix", {"virtual_tokens": 5}, 5 * 2 * 2 * 64),
    ("tiny-llama", "prefix", {"virtual_tokens": 5, "prefix_projection": 8},
     5 * 32 + (32 * 8 + 8) + (8 * 2 * 2 * 32 + 2 * 2 * 32)),
])
def test_trainable_counts(name, spec, kw, count):
    _, m, method = setup(name, spec, **kw)
    params = dict(m.named_parameters())
    assert sum(params[n].numel() for n in trainable_names(m, method)) == count + 64 * 2 + 2


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("spec", ["prompt", "prefix"])
def test_padded_rows_equal_rows_alone(name, spec):
    b, m, _ = setup(name, spec, virtual_tokens=4)
    assert_rows_pool_as_alone(b.tokenizer, m)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("spec", ["prompt", "prefix"])
def test_only_virtual_tokens_and_head_train(name, spec):
    _, m, method = setup(name, spec, virtual_tokens=4)
    m.train()
    names = set(trainable_names(m, method))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    losses = fit(m, torch.randint(10, 1000, (4, 6)), torch.tensor([0, 1, 1, 0]), steps=25, lr=3e-2)
    assert {n for n, p in m.named_parameters() if not torch.equal(p, before[n])} == names
    assert losses[-1] < 0.5 * losses[0]


def test_prompt_init_from_text_and_errors():
    b, m, _ = setup("tiny-llama", "prompt", virtual_tokens=5, prompt_init="text", prompt_text="is it spam")
    ids = b.tokenizer("is it spam", add_special_tokens=False)["input_ids"]
    want = b.arch.embeddings.weight[torch.tensor((ids * 5)[:5])]
    torch.testing.assert_close(m.prompt.embedding.weight, want)
    with pytest.raises(PeftlabError, match="--prompt-text"):
        setup("tiny-llama", "prompt", prompt_init="text")
    with pytest.raises(PeftlabError, match="leaves no room"):
        setup("tiny-llama", "prompt", virtual_tokens=600)
    with pytest.raises(PeftlabError, match="--virtual-tokens must be at least 1"):
        parse_method("prefix", MethodArgs(virtual_tokens=0))


def test_prefix_projection_folds_away():
    _, m, _ = setup("tiny-llama", "prefix", virtual_tokens=3, prefix_projection=16)
    ids = torch.randint(10, 1000, (2, 5))
    with torch.no_grad():
        before = m(ids, torch.ones_like(ids))
        m.prefix.fold()
        assert m.prefix.transform is None
        torch.testing.assert_close(m(ids, torch.ones_like(ids)), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("spec", ["prompt", "prefix"])
def test_same_logits_as_hf_peft(name, spec):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    b, m, _ = setup(name, spec, virtual_tokens=4)
    config = (PromptTuningConfig if spec == "prompt" else PrefixTuningConfig)(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=4)
    ref = get_peft_model(copy.deepcopy(b.model), config).eval()
    ours = (m.prompt if spec == "prompt" else m.prefix).embedding.weight
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(ours)
    ids = torch.randint(10, 1000, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        from peftlab.virtual import body_inputs

        kw, _, _ = body_inputs(m, ids, mask)
        hidden = m.body(**kw).last_hidden_state[:, -ids.shape[1]:]
        logits = b.arch.lm_head(hidden)
        theirs = ref(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
    torch.testing.assert_close(logits, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_prefix_starts_from_the_models_own_keys_and_values(name):
    b, m, _ = setup(name, "prefix", virtual_tokens=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, b.arch.embeddings.num_embeddings, (1, 3), generator=g)
    with torch.no_grad():
        cache = b.arch.body(input_ids=ids, use_cache=True).past_key_values
    for i, (k, v) in enumerate(m.prefix.key_values(1)):
        torch.testing.assert_close(k, cache.layers[i].keys)
        torch.testing.assert_close(v, cache.layers[i].values)


def each_row_its_own_prompt(monkeypatch) -> None:
    """Every row runs the soft prompt itself, in front of its text (as before the shared prompt)."""
    monkeypatch.setattr(virtual, "shares_rows", lambda *a: False)


@pytest.mark.parametrize("name,spec", [("tiny-llama", "prompt"), ("tiny-gpt2", "prompt"),
                                       ("tiny-llama", "prompt+prefix"), ("tiny-llama", "prompt+lora")])
@pytest.mark.parametrize("floor", [0.0, float("inf")], ids=["unpadded", "padded"])
def test_a_shared_prompt_equals_each_rows_own(name, spec, floor, monkeypatch):
    """The prompt's keys and values, computed once for the batch, give each row's outputs and the
    trained gradients as running the prompt in every row (fp32 to 1e-5; bf16 autocast with fp32
    attention, as training runs, to its rounding); the pooled last block and no work on padding
    still apply."""
    b, m, _ = setup(name, spec, virtual_tokens=4)
    m.train()  # the tiny models draw no dropout: training shares the prompt too
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids, mask = padded_batch(b.tokenizer)
    monkeypatch.setattr(unpad, "MIN_PADDING", floor)

    def run(bf16: bool):
        calls = []
        real = virtual.start_cache
        monkeypatch.setattr(virtual, "start_cache", lambda *a: calls.append(1) or real(*a))
        m.zero_grad()
        with autocast("bf16" if bf16 else "fp32"), fp32_attention([m]):
            out = m(ids, mask)
        out.float().square().sum().backward()
        monkeypatch.setattr(virtual, "start_cache", real)
        return out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None], len(calls)

    for bf16, tol in ((False, 1e-5), (True, 2e-2)):
        with monkeypatch.context() as mp:
            each_row_its_own_prompt(mp)
            ref, ref_grads, ref_calls = run(bf16)
        out, grads, calls = run(bf16)
        assert (calls, ref_calls) == (1, 0)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        assert len(grads) == len(ref_grads) > 0
        for g, r in zip(grads, ref_grads):
            assert (g - r).norm() <= tol * max(r.norm(), 1e-3 * max(x.norm() for x in ref_grads))


def test_a_shared_prompt_keeps_the_language_models_loss_and_label_words(monkeypatch):
    """Generation's training loss and label-word scores (multi-token words read several positions,
    one-token words the last): the same with the prompt shared as with each row's own."""
    b = load_backbone("tiny-llama")
    torch.manual_seed(0)
    lm = LanguageModel(b.arch, b.tokenizer)
    parse_method("prompt", MethodArgs(virtual_tokens=4)).apply(lm)
    pairs = encode_pairs(["the cat sat on the mat and then some more", "hi"], ["mat", "there you are"],
                         b.tokenizer, "Story: {text}\nAnswer:", 64)
    batch = collate_pairs(pairs, [0, 1], b.tokenizer.pad_token_id)
    torch.manual_seed(0)
    scorers = []
    for words in (("great day", "bad"), ("good", "bad")):
        torch.manual_seed(0)
        scorers.append(Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=words).eval())
        parse_method("prompt", MethodArgs(virtual_tokens=4)).apply(scorers[-1])
    ids, mask = padded_batch(b.tokenizer)
    got = [lm_loss(lm, batch), *(s(ids, mask) for s in scorers)]
    each_row_its_own_prompt(monkeypatch)
    for a, want in zip(got, [lm_loss(lm, batch), *(s(ids, mask) for s in scorers)], strict=True):
        torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)


def test_one_token_label_words_score_after_a_prefix():
    """The last position of the body's input, not of the mask over the prefix's keys too (an
    IndexError before): a prefix started from the model's own keys and values of some tokens
    scores as a soft prompt of those tokens' embeddings does (both draw the same tokens)."""
    b = load_backbone("tiny-llama")
    ids, mask = padded_batch(b.tokenizer)
    scores = []
    for spec in ("prefix", "prompt"):
        torch.manual_seed(0)
        m = Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=("good", "bad")).eval()
        parse_method(spec, MethodArgs(virtual_tokens=4, prompt_init="vocab", prefix_init="tokens")).apply(m)
        scores.append(m(ids, mask).detach())
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)


def test_the_prompt_is_shared_only_where_rows_would_compute_the_same():
    """Not for one row, a body that attends both ways (BERT, --bidirectional), dropout drawn in
    training, or rows routed to their own adapters."""
    _, m, _ = setup("tiny-llama", "prompt")
    assert virtual.shares_rows(m.train(), 2) and not virtual.shares_rows(m, 1)
    with virtual.rows_by_index():
        assert not virtual.shares_rows(m, 2)
    m.arch.body.config.attention_dropout = 0.1
    assert not virtual.shares_rows(m, 2) and virtual.shares_rows(m.eval(), 2)
    assert not virtual.shares_rows(setup("tiny-bert", "prompt")[1], 2)
    _, m, _ = setup("tiny-gpt2", "prompt")
    m.arch.body.h[0].mlp.dropout.p = 0.1
    assert not virtual.shares_rows(m.train(), 2) and virtual.shares_rows(m.eval(), 2)
    b = load_backbone("tiny-llama")
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer, bidirectional=True)
    parse_method("prompt", MethodArgs()).apply(m)
    assert not virtual.shares_rows(m, 2)


def test_common_start_finds_what_every_row_starts_with():
    """Left, right and two-sided padding; each row keeps `keep` tokens of its own; nothing shared
    below MIN_SHARED of the real tokens or when a row's tokens are not in one piece."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 9, 9, 1], [0, 5, 6, 7, 2, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    lead, rest, rest_mask = virtual.common_start(ids, mask)
    assert lead.tolist() == [[5, 6, 7]]
    assert rest.tolist() == [[0, 0, 8], [9, 9, 1], [0, 2, 3]]
    assert rest_mask.tolist() == [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert virtual.common_start(ids, mask, keep=2)[0].tolist() == [[5, 6]]
    right = virtual.common_start(torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 1, 2]]),
                                 torch.tensor([[1, 1, 1, 1, 0], [1] * 5]))
    assert [t.tolist() for t in right] == [[[5, 6, 7]], [[8, 0], [1, 2]], [[1, 0], [1, 1]]]
    both = virtual.common_start(torch.tensor([[0, 5, 6, 7, 4, 0], [5, 6, 7, 1, 2, 3]]),
                                torch.tensor([[0, 1, 1, 1, 1, 0], [1] * 6]))
    assert [t.tolist() for t in both] == [[[5, 6, 7]], [[0, 4, 0], [1, 2, 3]], [[0, 1, 0], [1, 1, 1]]]
    differ = torch.tensor([[5, 6, 1, 2, 3, 4], [5, 9, 1, 2, 3, 4]])
    assert virtual.common_start(differ, torch.ones(2, 6, dtype=torch.long)) is None
    assert virtual.common_start(ids, torch.tensor([[1, 0, 1, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1]])) is None


def test_a_shared_start_leaves_label_words_and_decoding_as_they_were(monkeypatch):
    """k-shot prompts start alike: run once for the batch, the label words' scores (one-token and
    multi-token, in fp32 and bf16) and greedy decoding (cached and not) are those of every row
    running its whole prompt."""
    b = load_backbone("tiny-llama")
    support = "Review: a fine film\nSentiment: good\n\nReview: dull and long\nSentiment: bad\n\nReview: "
    texts = [support + q + "\nSentiment:" for q in ("great fun", "a mess", "not my cup of tea at all", "ok")]
    batch = b.tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert virtual.common_start(ids, mask) is not None
    calls = []
    real = virtual.start_cache
    monkeypatch.setattr(virtual, "start_cache", lambda *a: calls.append(1) or real(*a))
    models = []
    for words in (("good", "bad"), ("good film", "bad")):
        torch.manual_seed(0)
        models.append(Classifier(b.arch, 2, tokenizer=b.tokenizer, label_words=words).eval())

    def run():
        with torch.no_grad():
            scores = [m(ids, mask) for m in models]
            with autocast("bf16"):
                scores += [m(ids, mask) for m in models]
        return scores, [generate(models[0], ids, mask, 6, use_cache=c) for c in (True, False)]
    shared, decoded = run()
    assert len(calls) == 4 + 1 + 6  # each scoring call, the cached prefill, each of 6 uncached steps
    monkeypatch.setattr(virtual, "common_start", lambda *a, **k: None)
    alone, decoded_alone = run()
    for a, want, tol in zip(shared, alone, (1e-5, 1e-5, 2e-2, 2e-2), strict=True):
        torch.testing.assert_close(a, want, atol=tol, rtol=tol)
    assert all(torch.equal(d, decoded_alone[0]) for d in [*decoded, decoded_alone[1]])
