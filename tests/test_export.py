import pytest
import torch
from transformers import AutoModelForCausalLM

from peftlab.cli import main
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.saved import load_run
from peftlab.train import TrainArgs


def tiny_run(task, out, method, **kw):
    cfg = RunConfig(model="tiny-llama", task=task, method=method, train_limit=64, eval_limit=16, out=str(out),
                    train=TrainArgs(epochs=1, batch_size=16), **kw)
    train_run(cfg, progress=False)
    return out


@pytest.mark.parametrize("method", ["lora", "ia3", "last-1", "lora+last-1"])
def test_merge_writes_a_plain_transformers_model(method, toy_task, tmp_path):
    run = tiny_run(toy_task, tmp_path / "run", method)
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    _, p = load_run(run)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(10, 1000, (2, 7))
    with torch.no_grad():
        ours = p.model.body(input_ids=ids).last_hidden_state
        theirs = plain.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "head.safetensors").is_file()


def test_merge_of_a_model_loaded_from_a_folder_writes_a_loadable_tokenizer(toy_task, tmp_path):
    """Models from a folder, the hub or the embedded packages load through from_pretrained, whose
    tokenizer must save (a dtype kwarg once broke save_pretrained: merge died half-written)."""
    from transformers import AutoTokenizer

    from peftlab.models import load_backbone

    b = load_backbone("tiny-llama")
    b.model.save_pretrained(tmp_path / "base")
    b.tokenizer.save_pretrained(tmp_path / "base")
    cfg = RunConfig(model=str(tmp_path / "base"), task=toy_task, method="lora", train_limit=32, eval_limit=16,
                    out=str(tmp_path / "run"), train=TrainArgs(epochs=1, batch_size=16))
    train_run(cfg, progress=False)
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok("apple pie")["input_ids"] == b.tokenizer("apple pie")["input_ids"]
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 2  # not over a model
    assert not list(tmp_path.glob(".*partial"))


def test_merge_refuses_changes_that_do_not_fold(toy_task, tmp_path, capsys):
    run = tiny_run(toy_task, tmp_path / "run", "prompt")
    assert main(["merge", str(run), "--out", str(tmp_path / "m")]) == 2
    assert "do not fold into the base weights (prompt)" in capsys.readouterr().err


def test_export_gives_a_peft_adapter(toy_task, tmp_path):
    from peft import PeftModel

    from peftlab.models import load_backbone

    run = tiny_run(toy_task, tmp_path / "run", "lora")
    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    ref = PeftModel.from_pretrained(load_backbone("tiny-llama").model, str(tmp_path / "adapter")).eval()
    _, p = load_run(run)
    ids = torch.randint(10, 1000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ref.base_model.model.model(input_ids=ids).last_hidden_state,
                                   p.model.body(input_ids=ids).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec,message", [
    ("lora+lora", "names a part twice"), ("full+lora", "mixes 'full' with others"),
    ("prompt+nope", "unknown method 'nope'"),
])
def test_bad_mixes(spec, message, toy_task, tmp_path, capsys):
    assert main(["train", "--model", "tiny-llama", "--task", toy_task, "--method", spec,
                 "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_mam_mix_trains_prefix_and_parallel_adapter(toy_task, tmp_path):
    r = train_run(RunConfig(model="tiny-llama", task=toy_task, method="mam", train_limit=64, eval_limit=16,
                            out=str(tmp_path / "r"), train=TrainArgs(epochs=1)), progress=False)
    # prefix: 20 tokens x 2 layers x (k, v) x 32; adapter: 2 blocks x 580; head 130
    assert r["trainable_params"] == 20 * 2 * 2 * 32 + 2 * 580 + 130


def test_yaml_mix_with_per_part_settings(tmp_path):
    from peftlab.errors import PeftlabError
    from peftlab.heads import Classifier
    from peftlab.methods import parse_method, trainable_names
    from peftlab.models import load_backbone

    spec = tmp_path / "mix.yaml"
    spec.write_text("method:\n  - lora: {lora_r: 2, lora_targets: q_proj}\n  - adapter: {adapter_reduction: 8}\n")
    m = Classifier(load_backbone("tiny-llama").arch, 2)
    method = parse_method(str(spec))
    method.apply(m)
    params = dict(m.named_parameters())
    # LoRA r=2 on q_proj (64 -> 64) and a parallel FFN adapter of width 8, in both blocks
    want = 2 * (2 * (64 + 64)) + 2 * ((64 * 8 + 8) + (8 * 64 + 64)) + 130
    assert sum(params[n].numel() for n in trainable_names(m, method)) == want
    spec.write_text("method:\n  - lora: {rank: 2}\n")
    with pytest.raises(PeftlabError, match=r"part 'lora': unknown setting\(s\) \['rank'\]"):
        parse_method(str(spec))


def test_an_embedded_model_s_adapter_names_its_hub_id(toy_task, tmp_path, monkeypatch):
    import json

    from peftlab.heads import Classifier
    from peftlab.models import HUB_IDS, load_backbone, same_model
    from peftlab.peft_format import load_adapter

    assert same_model("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct") and not same_model("smollm2-135m", "gpt2")
    monkeypatch.setitem(HUB_IDS, "tiny-llama", "peftlab-tests/tiny-llama")  # as an embedded model with a hub id
    run = tiny_run(toy_task, tmp_path / "run", "lora")
    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "peftlab-tests/tiny-llama"  # what AutoPeftModel looks up
    fresh = load_backbone("tiny-llama")
    load_adapter(tmp_path / "adapter", Classifier(fresh.arch, 2), fresh.model, base="tiny-llama")  # same model
