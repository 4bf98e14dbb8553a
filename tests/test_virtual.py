import copy

import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.methods import MethodArgs, parse_method, trainable_names
from tests.conftest import adapted, assert_rows_pool_as_alone, fit

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
