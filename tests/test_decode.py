import pytest
import torch

from peftlab.decode import Sampling, filter_logits, generate
from peftlab.heads import Classifier
from peftlab.methods import MethodArgs, parse_method
from peftlab.models import load_backbone

PROMPTS = ["The cat sat on the", "Hello"]


def lm(name: str, spec: str | None = None):
    b = load_backbone(name)
    torch.manual_seed(0)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer).eval()  # the head is unused when generating
    if spec:
        parse_method(spec, MethodArgs(virtual_tokens=3)).apply(m)
        with torch.no_grad():  # trained-looking virtual tokens and LoRA, not their init (B = 0: a no-op)
            for n, p in m.named_parameters():
                if n.startswith(("prompt.", "prefix.")) or "lora_B" in n:
                    p.copy_(torch.randn_like(p) * (0.3 if "lora_B" in n else 1))
    return b, m


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().view(-1).tolist()
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.5)) == [0]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.7)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.71)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_k=2, top_p=0.9)) == [0, 1]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # order of the vocabulary does not matter
    assert kept(filter_logits(shuffled, top_p=0.7)) == [1, 4]


def test_temperature_sharpens_and_seeded_sampling_repeats():
    b, m = lm("tiny-llama")
    batch = b.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    s = Sampling(temperature=1.0, top_p=0.9)
    run = lambda seed: generate(m, batch["input_ids"], batch["attention_mask"], 8, s, seed=seed)
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("spec", [None, "prompt", "prefix", "lora"])
def test_cached_decoding_equals_uncached(name, spec):
    b, m = lm(name, spec)
    batch = b.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    args = (m, batch["input_ids"], batch["attention_mask"], 12)
    assert torch.equal(generate(*args, use_cache=True), generate(*args, use_cache=False))


def test_an_adapter_changes_what_is_decoded():
    b, plain = lm("tiny-llama")
    _, adapted = lm("tiny-llama", "lora")
    batch = b.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert not torch.equal(generate(plain, batch["input_ids"], batch["attention_mask"], 8),
                           generate(adapted, batch["input_ids"], batch["attention_mask"], 8))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_greedy_equals_transformers_generate(name):
    b, m = lm(name)
    tok = b.tokenizer
    for texts in (PROMPTS[:1], PROMPTS * 4):  # batch 1, and a left-padded batch of 8
        batch = tok(texts, padding=True, return_tensors="pt")
        ours = generate(m, batch["input_ids"], batch["attention_mask"], 10, pad_id=tok.pad_token_id)
        theirs = b.model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=None)[:, batch["input_ids"].shape[1]:]
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spec", [None, "prompt"])
def test_decoding_stops_where_learned_positions_run_out(spec):
    from peftlab.errors import PeftlabError

    b, m = lm("tiny-gpt2", spec)  # 512 positions; the prompt tuning's 3 virtual tokens take 3 of them
    virtual = 3 if spec else 0
    ids = torch.randint(100, 1000, (2, 505 - virtual))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a shorter, left-padded row: the longest decides
    with pytest.warns(UserWarning, match="gpt2's learned positions run out before 20 new tokens"):
        assert generate(m, ids, mask, 20).shape == (2, 7)  # 505 + 7 = 512 positions, not an IndexError
    with pytest.raises(PeftlabError, match=f"a prompt takes 512 of gpt2's 512 positions.*--max-length {511 - virtual}"):
        generate(m, torch.randint(100, 1000, (1, 512 - virtual)), torch.ones(1, 512 - virtual, dtype=torch.long), 5)


def test_repetition_penalty_equals_transformers_and_near_zero_temperature_is_greedy():
    b, m = lm("tiny-llama")
    batch = b.tokenizer(PROMPTS[:1], return_tensors="pt")
    args = (m, batch["input_ids"], batch["attention_mask"], 12)
    ours = generate(*args, Sampling(temperature=0, repetition_penalty=1.5))
    theirs = b.model.generate(**batch, max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                              eos_token_id=None, pad_token_id=b.tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, theirs) and not torch.equal(ours, generate(*args))  # the penalty changed tokens
    greedy = generate(*args)
    for s in (Sampling(temperature=1e-4), Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)):
        assert torch.equal(generate(*args, s, seed=3), greedy), s


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_decoding_passes_the_cache_under_the_current_name(name):
    import warnings

    b, m = lm(name, "prefix")  # a prefix cache, then the decoding cache
    batch = b.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with warnings.catch_warnings():  # transformers 5.24 renamed past_key_values to cache (gone in 5.40)
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        generate(m, batch["input_ids"], batch["attention_mask"], 3)


def test_rows_stop_at_stop_ids():
    b, m = lm("tiny-llama")
    batch = b.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    free = generate(m, batch["input_ids"], batch["attention_mask"], 6)
    stop = int(free[0, 2])
    out = generate(m, batch["input_ids"], batch["attention_mask"], 6, stop_ids=(stop,), pad_id=-1)
    first = (free[0] == stop).nonzero()[0].item()
    assert out[0, first] == stop and (out[0, first + 1:] == -1).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("spec", [None, "prefix", "lora"])
def test_a_bf16_kv_cache_changes_no_logit_under_bf16_autocast(name, spec):
    """Decoding under bf16 keeps its KV cache in bf16: attention reads exactly the values that
    autocast's casts of a fp32 cache would give, so every step's logits are bitwise the same."""
    from peftlab.decode import next_logits

    b, m = lm(name, spec)
    batch = b.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    runs = {}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for kv_dtype in (torch.bfloat16, None):
            ids, mask, past, steps = batch["input_ids"], batch["attention_mask"], None, []
            for _ in range(4):
                logits, past, mask = next_logits(m, ids, mask, past, kv_dtype=kv_dtype)
                steps.append(logits)
                ids, mask = logits.argmax(-1, keepdim=True), torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            runs[kv_dtype] = steps, {layer.keys.dtype for layer in past.layers} | {layer.values.dtype for layer in past.layers}
    (fast, held), (plain, plain_held) = runs[torch.bfloat16], runs[None]
    assert held == {torch.bfloat16}
    assert all(torch.equal(a, c) for a, c in zip(fast, plain))
    if name == "tiny-llama":  # rotary keys are fp32 under autocast: transformers' own cache grows them in fp32
        assert torch.float32 in plain_held  # (5.23 stores the values in fp32 too, 5.24 in bf16)


def test_a_plain_model_keeps_the_end_of_a_long_prompt_and_room_to_generate():
    from peftlab.generator import load_generator

    g = load_generator("tiny-gpt2")  # 512 learned positions
    with pytest.warns(UserWarning, match="kept only their last 500 tokens: tiny-gpt2 has 512 positions and 12"):
        pairs = g.frame(["the end of a long story " * 200], 12)
    assert len(pairs.input_ids[0]) == 500
    with pytest.warns(UserWarning, match="kept only their last"):
        (text,) = g.generate(["the end of a long story " * 200], max_new_tokens=12)
    assert text  # 12 new tokens fit: no error, no cut in the new tokens
