"""Adapters cross-load with HF PEFT both ways and give the same outputs."""

import pytest
import torch

from peftlab.heads import Classifier
from peftlab.methods import MethodArgs, parse_method, trainable_names
from peftlab.models import load_backbone
from peftlab.peft_format import load_adapter, save_adapter
from peftlab.virtual import body_inputs

CASES = [("tiny-llama", "lora", {"lora_targets": "q_proj,v_proj"}), ("tiny-gpt2", "lora", {"lora_targets": "c_attn"}),
         ("tiny-llama", "prompt", {"virtual_tokens": 3}), ("tiny-llama", "prefix", {"virtual_tokens": 3}),
         ("tiny-gpt2", "prefix", {"virtual_tokens": 3}), ("tiny-llama", "ia3", {})]


def build(name, spec, kw):
    b = load_backbone(name)
    torch.manual_seed(0)
    m = Classifier(b.arch, 2, tokenizer=b.tokenizer).eval()
    method = parse_method(spec, MethodArgs(**kw))
    method.apply(m)
    torch.manual_seed(1)
    with torch.no_grad():
        for n in trainable_names(m, method):
            p = dict(m.named_parameters())[n]
            p.add_(torch.randn_like(p) * 0.2)
    return b, m, method


def lm_logits(m, ids):
    kw, _, _ = body_inputs(m, ids, torch.ones_like(ids))
    return m.arch.lm_head(m.body(**kw).last_hidden_state[:, -ids.shape[1]:])


@pytest.mark.parametrize("name,spec,kw", CASES)
def test_peftlab_adapter_loads_in_hf_peft(name, spec, kw, tmp_path):
    from peft import PeftModel

    b, m, method = build(name, spec, kw)
    save_adapter(tmp_path, method, m, b.model, trainable_names(m, method), name)
    ref = PeftModel.from_pretrained(load_backbone(name).model, str(tmp_path)).eval()
    ids = torch.randint(10, 1000, (2, 6))
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -6:]
        torch.testing.assert_close(lm_logits(m, ids), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,spec,kw", CASES)
def test_hf_peft_adapter_loads_in_peftlab(name, spec, kw, tmp_path):
    b, m, method = build(name, spec, kw)
    save_adapter(tmp_path / "ours", method, m, b.model, trainable_names(m, method), name)
    # round trip through PEFT: load ours, save with PEFT's own writer, load that back here
    from peft import PeftModel

    ref = PeftModel.from_pretrained(load_backbone(name).model, str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "theirs"))
    fresh = load_backbone(name)
    torch.manual_seed(0)
    m2 = Classifier(fresh.arch, 2, tokenizer=fresh.tokenizer).eval()
    load_adapter(tmp_path / "theirs", m2, fresh.model)
    m2.head.load_state_dict(m.head.state_dict())
    ids = torch.randint(10, 1000, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids, torch.ones_like(ids)), m(ids, torch.ones_like(ids)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [{"adapter": "houlsby", "adapter_scaling": 2.0},
                                {"adapter": "parallel", "adapter_at": "attn,ffn", "adapter_reduction": 8}])
def test_bottleneck_adapters_round_trip_with_their_placement_and_scaling(kw, tmp_path):
    """PEFT has no bottleneck adapters: peftlab writes them in PEFT's layout as "BOTTLENECK"."""
    b, m, method = build("tiny-llama", "adapter", kw)
    save_adapter(tmp_path, method, m, b.model, trainable_names(m, method), "tiny-llama")
    fresh = load_backbone("tiny-llama")
    torch.manual_seed(0)
    m2 = Classifier(fresh.arch, 2, tokenizer=fresh.tokenizer).eval()
    loaded = load_adapter(tmp_path, m2, fresh.model)
    assert (loaded.placement, loaded.scaling, loaded.reduction, loaded.at) == \
        (method.placement, method.scaling, method.reduction, method.at)
    m2.head.load_state_dict(m.head.state_dict())
    ids = torch.randint(10, 1000, (2, 6))
    with torch.no_grad():
        plain = Classifier(load_backbone("tiny-llama").arch, 2).eval()
        plain.head.load_state_dict(m.head.state_dict())
        assert (m(ids, torch.ones_like(ids)) - plain(ids, torch.ones_like(ids))).abs().max() > 1e-3  # adapters act
        torch.testing.assert_close(m2(ids, torch.ones_like(ids)), m(ids, torch.ones_like(ids)), atol=1e-6, rtol=0)
