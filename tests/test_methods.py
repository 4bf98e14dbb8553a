import pytest
import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError
from peftlab.heads import Classifier
from peftlab.methods import method_names, parse_method, set_trainable, trainable_names
from peftlab.models import load_backbone

HEAD = ["head.weight", "head.bias"]


def classifier(name: str, labels: int = 2) -> Classifier:
    torch.manual_seed(0)
    return Classifier(load_backbone(name).arch, labels)


def names_for(model, spec: str) -> list[str]:
    method = parse_method(spec)
    method.apply(model)
    return trainable_names(model, method)


def block(prefix: str, model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


# Parameters of one tiny-llama block, in closed form: hidden 64, 4 heads of 16, 2 KV heads, MLP 128.
LLAMA_BLOCK = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64


def test_trainable_sets_on_tiny_llama():
    m = classifier("tiny-llama")
    layer = lambda i: block(f"body.layers.{i}.", m)
    assert names_for(m, "head") == HEAD
    assert names_for(m, "last-1") == layer(1) + HEAD
    assert names_for(m, "first-1") == layer(0) + HEAD
    assert names_for(m, "middle-1") == layer(0) + HEAD  # (2 - 1) // 2 = block 0
    assert names_for(m, "last-2") == layer(0) + layer(1) + HEAD
    assert names_for(m, "last-block+norm") == layer(1) + ["body.norm.weight"] + HEAD
    assert names_for(m, "full") == [n for n, _ in m.named_parameters()]
    params = dict(m.named_parameters())
    assert sum(params[n].numel() for n in layer(1)) == LLAMA_BLOCK
    assert sum(params[n].numel() for n in HEAD) == 64 * 2 + 2


def test_trainable_sets_on_tiny_gpt2_and_bert():
    g = classifier("tiny-gpt2")
    assert names_for(g, "last-block+norm") == block("body.h.1.", g) + ["body.ln_f.weight", "body.ln_f.bias"] + HEAD
    bias = names_for(g, "bias")
    assert bias == [n for n, _ in g.named_parameters() if n.startswith("body.") and n.endswith(".bias")] + HEAD
    assert len(bias) == 2 * 6 + 2 + 1  # per block: ln_1, c_attn, c_proj, ln_2, c_fc, mlp c_proj; ln_f; head
    b = classifier("tiny-bert")  # post-LN: no final norm, so last-block+norm is the last block
    assert names_for(b, "last-block+norm") == block("body.encoder.layer.1.", b) + HEAD
    assert not any("pooler" in n for n, _ in b.named_parameters())


def test_bias_on_a_model_without_biases_is_a_clear_error():
    with pytest.raises(PeftlabError, match="needs bias terms.*llama"):
        names_for(classifier("tiny-llama"), "bias")


@pytest.mark.parametrize("spec", ["last-3", "first-9"])
def test_too_many_blocks(spec):
    with pytest.raises(PeftlabError, match="the model has 2"):
        names_for(classifier("tiny-gpt2"), spec)


@pytest.mark.parametrize("spec,table", [("prompt", "prompt.embedding.weight"), ("prefix", "prefix.embedding.weight")])
def test_prompt_and_prefix_inits_follow_the_run_seed(spec, table):
    def init(seed: int) -> torch.Tensor:
        b = load_backbone("tiny-llama")
        torch.manual_seed(seed)  # as prepare() seeds a run
        m = Classifier(b.arch, 2, tokenizer=b.tokenizer)
        parse_method(spec).apply(m)
        return m.get_parameter(table).detach().clone()
    assert torch.equal(init(0), init(0)) and not torch.equal(init(0), init(1))


def test_prompt_inits_draw_what_they_say():
    from peftlab.methods import MethodArgs

    b = load_backbone("tiny-llama")
    table = b.arch.embeddings.weight.detach()

    def init(how: str, text: str | None = None) -> torch.Tensor:
        m = Classifier(b.arch, 2, tokenizer=b.tokenizer)
        parse_method("prompt", MethodArgs(prompt_init=how, prompt_text=text, virtual_tokens=5)).apply(m)
        return m.prompt.embedding.weight.detach()

    def rows_of_table(x: torch.Tensor) -> list[bool]:
        return [bool((table == row).all(-1).any()) for row in x]
    assert all(rows_of_table(init("vocab"))) and not any(rows_of_table(init("random")))
    ids = b.tokenizer("apple pie", add_special_tokens=False)["input_ids"]
    assert torch.equal(init("text", "apple pie"), table[torch.tensor((ids * 5)[:5])])  # the text's tokens, repeated


def test_prefix_inits_draw_what_they_say():
    from peftlab.methods import MethodArgs
    from peftlab.methods.prefix import real_token_key_values

    b = load_backbone("tiny-llama")

    def init(how: str) -> torch.Tensor:
        torch.manual_seed(3)
        m = Classifier(b.arch, 2, tokenizer=b.tokenizer)
        parse_method("prefix", MethodArgs(prefix_init=how, virtual_tokens=4)).apply(m)
        return m.prefix.table().detach()

    torch.manual_seed(3)
    real = real_token_key_values(Classifier(b.arch, 2, tokenizer=b.tokenizer), 4, 3)
    assert torch.equal(init("tokens"), real)  # the frozen model's own keys and values
    noise = init("random")
    assert noise.shape == real.shape and not torch.allclose(noise, real)
    assert abs(noise.std().item() - 1) < 0.1 and abs(noise.mean().item()) < 0.1  # PEFT's N(0, 1)


@pytest.mark.parametrize("spec", ["lora+ia3", "ia3+lora"])
def test_lora_and_ia3_share_no_projection(spec):
    from tests.conftest import adapted

    with pytest.raises(PeftlabError, match="v_proj' is already adapted by another method"):
        adapted("tiny-llama", spec)  # both take v_proj by default: one wrapper per projection
    _, m, method = adapted("tiny-llama", spec, lora_targets="q_proj")
    names = trainable_names(m, method)
    assert any("q_proj.lora_A" in n for n in names) and any("v_proj.ia3_l" in n for n in names)


@pytest.mark.parametrize("spec", ["lora-ish", "last", "last-0", "everything"])
def test_unknown_method_lists_valid_specs(spec):
    with pytest.raises(PeftlabError, match="method|N must"):
        parse_method(spec)
    assert "last-block+norm" in method_names()


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("spec", ["head", "last-1", "first-1", "last-block+norm", "full"])
def test_only_trainable_parameters_change(model_name, spec):
    m = classifier(model_name)
    names = names_for(m, spec)
    set_trainable(m, names)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(10, 1000, (4, 7))
    loss = F.cross_entropy(m(ids, torch.ones_like(ids)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    # every trainable tensor that receives gradient moves; nothing else does
    assert changed == set(names), (spec, changed ^ set(names))
    assert set(HEAD) <= changed


@pytest.mark.parametrize("spec,changed,unread", [
    ("head", {"lora_r": 4, "virtual_tokens": 5}, ["lora_r", "virtual_tokens"]),
    ("lora", {"lora_r": 4, "rslora": True}, []),
    ("lora+last-1", {"lora_targets": "c_attn", "prefix_init": "random"}, ["prefix_init"]),
    ("mam", {"virtual_tokens": 5, "adapter_reduction": 8, "prefix_projection": 16}, []),
    ("prompt", {"prompt_init": "random", "prefix_projection": 16}, ["prefix_projection"]),
    ("mam", {"adapter": "houlsby", "adapter_reduction": 8, "adapter_at": "attn"}, ["adapter", "adapter_at"]),
])
def test_settings_no_part_of_the_method_reads_are_named(spec, changed, unread):
    from peftlab.methods import MethodArgs, unread_args

    args = MethodArgs(**changed)
    assert unread_args(parse_method(spec, args), args) == unread


def test_compare_warns_once_about_settings_none_of_its_methods_use():
    import warnings

    from peftlab.methods import MethodArgs
    from peftlab.runconfig import warn_unread
    from peftlab.runconfig import RunConfig

    cfg = RunConfig(method_args=MethodArgs(lora_r=4, virtual_tokens=5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unread(cfg, ["head", "lora", "prompt"])  # each setting is used by one of them
        warn_unread(cfg, ["head", "lora"])
    assert [str(w.message) for w in caught] == ["--virtual-tokens set, but none of head, lora uses it"]
