
import pytest
import torch

from peftlab.checkpoint import save_json, save_weights
from peftlab.errors import PeftlabError
from peftlab.heads import Classifier
from peftlab.methods import MethodArgs, merge, parse_method, trainable_names, unmerge
from peftlab.methods.ia3 import IA3Layer
from peftlab.models import load_backbone
from peftlab.run import CONFIG, WEIGHTS, prepare
from peftlab.runconfig import RunConfig
from peftlab.saved import load_run
from peftlab.train import logits_fn, predict
from tests.conftest import adapted, fit

HEAD = 64 * 2 + 2


setup = adapted


def count(m, method) -> int:
    params = dict(m.named_parameters())
    return sum(params[n].numel() for n in trainable_names(m, method))


BOTTLENECK = (64 * 4 + 4) + (4 * 64 + 64)  # hidden 64 / reduction 16 = width 4: down + up


@pytest.mark.parametrize("name,kw,per_block", [
    ("tiny-llama", {"adapter": "parallel"}, BOTTLENECK),
    ("tiny-llama", {"adapter": "houlsby"}, 2 * BOTTLENECK),
    ("tiny-gpt2", {"adapter": "pfeiffer"}, BOTTLENECK),
    ("tiny-bert", {"adapter": "parallel", "adapter_at": "attn,ffn"}, 2 * BOTTLENECK),
])
def test_adapter_counts(name, kw, per_block):
    _, m, method = setup(name, "adapter", **kw)
    assert count(m, method) == 2 * per_block + HEAD


@pytest.mark.parametrize("name,per_block", [
    ("tiny-llama", 32 + 32 + 128),  # k (2 KV heads x 16), v, and the 128 FFN activations
    ("tiny-gpt2", 3 * 64 + 256),  # the fused c_attn output, and the 256 FFN activations
    ("tiny-bert", 64 + 64 + 128),
])
def test_ia3_counts(name, per_block):
    _, m, method = setup(name, "ia3")
    assert count(m, method) == 2 * per_block + HEAD


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("spec,kw", [("adapter", {"adapter": "houlsby"}), ("adapter", {"adapter": "parallel"}),
                                     ("ia3", {})])
def test_starts_equal_to_base_trains_only_its_params(name, spec, kw):
    b, m, method = setup(name, spec, **kw)
    arch = load_backbone(name).arch
    torch.manual_seed(0)
    base = Classifier(arch, 2)
    ids = torch.randint(10, 1000, (4, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask), base.eval()(ids, mask), atol=1e-6, rtol=0)
    m.train()
    names = set(trainable_names(m, method))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    losses = fit(m, ids, torch.tensor([0, 1, 1, 0]), steps=40, lr=2e-2)
    assert {n for n, p in m.named_parameters() if not torch.equal(p, before[n])} == names
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
def test_ia3_merges_exactly(name):
    _, m, _ = setup(name, "ia3")
    torch.manual_seed(2)
    for layer in (x for x in m.modules() if isinstance(x, IA3Layer)):
        torch.nn.init.uniform_(layer.ia3_l["default"], 0.5, 1.5)
    ids = torch.randint(10, 1000, (2, 5))
    with torch.no_grad():
        unmerged = m(ids, torch.ones_like(ids))
        assert merge(m) > 0
        torch.testing.assert_close(m(ids, torch.ones_like(ids)), unmerged, atol=1e-5, rtol=0)
        unmerge(m)
        torch.testing.assert_close(m(ids, torch.ones_like(ids)), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,targets", [("tiny-llama", ["k_proj", "v_proj", "down_proj"]),
                                          ("tiny-gpt2", ["c_attn", "mlp.c_proj"])])
def test_ia3_same_logits_as_hf_peft(name, targets):
    from peft import IA3Config, get_peft_model

    b, m, _ = setup(name, "ia3")
    ff = [t for t in targets if "down" in t or "mlp" in t]
    kw = {"fan_in_fan_out": True} if name == "tiny-gpt2" else {}
    ref = get_peft_model(load_backbone(name).arch.body, IA3Config(target_modules=targets, feedforward_modules=ff, **kw))
    torch.manual_seed(3)
    theirs = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        if "ia3_l" in n:
            with torch.no_grad():
                p.uniform_(0.5, 1.5)
                theirs["base_model.model." + n.removeprefix("body.")].copy_(p)
    ids = torch.randint(10, 1000, (2, 6))
    with torch.no_grad():
        a = m.body(input_ids=ids).last_hidden_state
        r = ref.eval()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("placement", ["parallel", "pfeiffer"])
def test_an_adapter_adds_its_scaled_bottleneck_of_the_right_input(placement):
    _, m, _ = setup("tiny-llama", "adapter", adapter=placement, adapter_scaling=2.0)
    torch.manual_seed(1)
    with torch.no_grad():  # up away from its zero init
        for p in m.adapters.parameters():
            p.normal_(std=0.2)
    mlp, ad = m.arch.blocks[0].mlp, m.adapters[0].adapters["ffn"]
    seen = {}
    hooks = [mlp.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0])),
             mlp.register_forward_hook(lambda mod, args, out: seen.update(y=out))]
    ids = torch.randint(10, 1000, (2, 5))
    with torch.no_grad():
        m(ids, torch.ones_like(ids))
        for h in hooks:
            h.remove()
        x, y = seen["x"], seen["y"]
        up = [p.clone() for p in ad.up.parameters()]
        for p in ad.up.parameters():
            p.zero_()
        base = mlp(x)  # the sublayer alone
        for p, q in zip(ad.up.parameters(), up):
            p.copy_(q)
        source = x if placement == "parallel" else base  # parallel reads the input, serial the output
        want = base + 2.0 * ad.up(torch.relu(ad.down(source)))
    assert (y - base).abs().max() > 1e-3
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_bad_adapter_options():
    with pytest.raises(PeftlabError, match="--adapter 'sideways' is unknown; valid: houlsby, pfeiffer, parallel"):
        parse_method("adapter", MethodArgs(adapter="sideways"))
    with pytest.raises(PeftlabError, match="--adapter-reduction"):
        parse_method("adapter", MethodArgs(adapter_reduction=0))


@pytest.mark.parametrize("spec", ["last-1", "bias", "lora", "prompt", "prefix", "adapter", "ia3"])
def test_save_load_round_trip_gives_identical_logits(spec, toy_task, tmp_path):
    cfg = RunConfig(model="tiny-gpt2", task=toy_task, method=spec, eval_limit=20)
    p = prepare(cfg)
    torch.manual_seed(5)
    trained = {}
    with torch.no_grad():
        for n, t in p.model.named_parameters():
            if n in p.trainable:
                t.add_(torch.randn_like(t) * 0.1)
                trained[n] = t
    save_json(tmp_path / CONFIG, __import__("dataclasses").asdict(cfg))
    save_weights(tmp_path / WEIGHTS, trained)
    tok = p.backbone.tokenizer
    want, _ = predict(p.model, p.data["test"], logits_fn(p.model, p.data["test"], tok.pad_token_id, tok.padding_side), 8)
    _, q = load_run(tmp_path)
    got, _ = predict(q.model, q.data["test"], logits_fn(q.model, q.data["test"], tok.pad_token_id, tok.padding_side), 8)
    assert (got == want).all()
