import copy

import pytest
import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError
from peftlab.heads import Classifier
from peftlab.methods import MethodArgs, merge, parse_method, set_trainable, trainable_names, unmerge
from peftlab.methods.lora import Lora, delete_adapter, disabled, lora_layers, per_row, set_active
from peftlab.models import load_backbone


def setup(name: str, **kw) -> tuple[Classifier, Lora]:
    torch.manual_seed(0)
    m = Classifier(load_backbone(name).arch, 2).eval()
    method = Lora(**kw)
    method.apply(m)
    set_trainable(m, trainable_names(m, method))
    return m, method


def randomize_b(m: Classifier) -> None:
    torch.manual_seed(1)
    for layer in lora_layers(m):
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b.weight, std=0.1)


def inputs():
    ids = torch.randint(10, 1000, (3, 6))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("name,kw,per_layer", [
    # q_proj 64->64 and v_proj 64->32 (2 KV heads of 16): r * (in + out) each
    ("tiny-llama", {}, 8 * (64 + 64) + 8 * (64 + 32)),
    # c_attn:q,v: A is r x 64, B covers the q and v thirds (128 outputs)
    ("tiny-gpt2", {}, 8 * 64 + 128 * 8),
    ("tiny-gpt2", {"targets": "c_attn"}, 8 * 64 + 192 * 8),
    ("tiny-bert", {"r": 4}, 2 * 4 * (64 + 64)),
    # all-linear on llama: q, k, v, o, gate, up, down
    ("tiny-llama", {"r": 2, "targets": "all-linear"},
     2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))),
])
def test_trainable_count_matches_the_formula(name, kw, per_layer):
    m, method = setup(name, **kw)
    params = dict(m.named_parameters())
    names = trainable_names(m, method)
    assert sum(params[n].numel() for n in names) == 2 * per_layer + (64 * 2 + 2)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
def test_starts_equal_to_base_and_merges_exactly(name):
    ids, mask = inputs()
    torch.manual_seed(0)
    base = Classifier(load_backbone(name).arch, 2).eval()
    m, _ = setup(name, targets="all-linear")
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask), base(ids, mask), atol=1e-6, rtol=0)  # B = 0 at init
        randomize_b(m)
        unmerged = m(ids, mask)
        assert not torch.allclose(unmerged, base(ids, mask), atol=1e-4)
        merge(m)
        torch.testing.assert_close(m(ids, mask), unmerged, atol=1e-5, rtol=0)
        with disabled(m):
            torch.testing.assert_close(m(ids, mask), base(ids, mask), atol=1e-5, rtol=0)
        torch.testing.assert_close(m(ids, mask), unmerged, atol=1e-5, rtol=0)
        unmerge(m)
        for layer in lora_layers(m):
            assert not layer.merged
        torch.testing.assert_close(m(ids, mask), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_only_lora_and_head_change_and_loss_falls(name):
    m, method = setup(name)
    m.train()
    names = set(trainable_names(m, method))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = inputs()
    y = torch.tensor([0, 1, 1])
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(m(ids, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names
    assert losses[-1] < 0.5 * losses[0]


def test_several_adapters_mixed_batch_and_delete():
    m, _ = setup("tiny-llama")
    Lora(adapter="other", r=4).apply(m)
    randomize_b(m)
    ids, mask = inputs()
    rows = ["default", "other", None]
    with torch.no_grad():
        alone = []
        for i, a in enumerate(rows):
            if a is None:
                with disabled(m):
                    alone.append(m(ids[i:i + 1], mask[i:i + 1]))
            else:
                set_active(m, a)
                alone.append(m(ids[i:i + 1], mask[i:i + 1]))
        with per_row(m, rows):
            mixed = m(ids, mask)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)
    delete_adapter(m, "other")
    assert all("other" not in layer.lora_A for layer in lora_layers(m))
    with pytest.raises(PeftlabError, match="do not exist"):
        set_active(m, "other")


def test_fused_qkv_parts_adapt_exactly_their_thirds():
    m, _ = setup("tiny-gpt2")  # the default c_attn:q,v: GPT-2's fused q|k|v, 64 outputs each
    randomize_b(m)
    layers = lora_layers(m)
    assert len(layers) == 2 and all(layer.base_layer.weight.shape == (64, 192) for layer in layers)
    for layer in layers:
        d = layer.delta_weight("default").T  # (out, in)
        assert d[:64].abs().sum() > 0 and d[128:].abs().sum() > 0 and not d[64:128].any()


def test_bad_targets_and_rank():
    with pytest.raises(PeftlabError, match="matched no projection.*q_proj"):
        setup("tiny-llama", targets="nothing_here")
    with pytest.raises(PeftlabError, match="--lora-r must be at least 1"):
        parse_method("lora", MethodArgs(lora_r=0))


@pytest.mark.parametrize("name,targets,peft_kw", [
    ("tiny-llama", "q_proj,v_proj", {"target_modules": ["q_proj", "v_proj"]}),
    ("tiny-gpt2", "c_attn,c_proj", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    ("tiny-llama", "q_proj,v_proj", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}),  # alpha/sqrt(r)
])
def test_same_logits_as_hf_peft(name, targets, peft_kw):
    from peft import LoraConfig, get_peft_model

    m, _ = setup(name, targets=targets, r=4, alpha=8, rslora=peft_kw.get("use_rslora", False))
    reference = copy.deepcopy(load_backbone(name).arch.body)
    randomize_b(m)
    ref = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, **peft_kw)).eval()
    ours = {n.removeprefix("body."): p for n, p in m.named_parameters() if "lora_" in n}
    theirs = dict(ref.named_parameters())
    for n, p in ours.items():
        with torch.no_grad():
            theirs["base_model.model." + n].copy_(p)
    ids, mask = inputs()
    with torch.no_grad():
        a = m.body(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_fast_path_without_dropout_equals_the_general_path(name):
    ids, mask = inputs()
    fast, _ = setup(name, targets="all-linear")
    randomize_b(fast)
    slow = copy.deepcopy(fast)
    for layer in lora_layers(slow):
        layer.lora_dropout["default"] = torch.nn.Dropout(0.0)  # not Identity: takes the general path
    grads = []
    for m in (fast, slow):
        m(ids, mask).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(fast(ids, mask), slow(ids, mask), atol=1e-6, rtol=1e-5)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,kw", [("tiny-llama", {}), ("tiny-gpt2", {}), ("tiny-gpt2", {"targets": "c_attn"})])
def test_inference_runs_one_adapter_merged_and_restores_the_weights_bit_for_bit(name, kw):
    from peftlab.methods.lora import merged_for_inference

    m, _ = setup(name, **kw)
    randomize_b(m)
    ids, mask = inputs()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        unmerged = m(ids, mask)
        with merged_for_inference(m) as merged:
            assert merged and all(layer.merged == ["default"] for layer in lora_layers(m))
            together = m(ids, mask)
    torch.testing.assert_close(together, unmerged, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())  # not w + d - d: the same bits
    assert all(layer.merged == [] for layer in lora_layers(m))


def test_inference_stays_unmerged_where_merging_would_be_wrong():
    from peftlab.methods.lora import merged_for_inference
    from peftlab.speed import bf16_weights

    m, _ = setup("tiny-llama")
    Lora(adapter="other").apply(m)
    set_active(m, "default", "other")
    with merged_for_inference(m) as merged:  # two adapters active
        assert not merged
    set_active(m, "default")
    with per_row(m, ["default", None, "default"]), merged_for_inference(m) as merged:  # rows routed apart
        assert not merged
    with bf16_weights([m], "bf16"), merged_for_inference(m) as merged:  # bf16 copies made from unmerged weights
        assert not merged
