"""End to end on the real embedded models and real data (small slices). Bars were measured:
see docs/benchmarks.md; each sits well below what the run reached, above what chance gives."""

import pytest

from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs

pytestmark = pytest.mark.slow


def test_smollm2_last_block_learns_sms_spam_in_bf16_as_in_fp32(tmp_path):
    """The foundation's scenario, and the performance issue's bf16 check on it: last block + final
    norm + head on real SMS spam, in fp32 (the reference) and in bf16 autocast, each with its
    default feature cache (the frozen 29 blocks run once, in the run's precision: bf16's are
    those its end-to-end epochs would compute, see test_features); same seed and batches, bf16's
    test accuracy no more than 1 point below fp32's. (bf16 through all 30 blocks every epoch ran
    here until 2026-11-24, 40 s more: 95.5 / macro-F1 88.7; the tiny-model tests and the demo's
    LoRA, full and prompt cells keep that path covered.)"""
    def run(precision):
        cfg = RunConfig(model="smollm2-135m", task="sms_spam", method="last-block+norm", train_limit=320,
                        eval_limit=200, out=str(tmp_path / precision),
                        train=TrainArgs(epochs=2, batch_size=16, precision=precision))
        return train_run(cfg, progress=False)
    fp32, bf16 = run("fp32"), run("bf16")
    assert fp32["cached_features"]["cut"] == bf16["cached_features"]["cut"] == 29
    # 87% of messages are ham: the bar needs spam found too (macro-F1), not just the majority class.
    # Measured (2026-11-24, 2 epochs of 320 rows): see docs/benchmarks.md
    for r in (fp32, bf16):
        assert r["test"]["accuracy"] >= 0.93 and r["test"]["macro_f1"] >= 0.85, (fp32["test"], bf16["test"])
    assert bf16["test"]["accuracy"] >= fp32["test"]["accuracy"] - 0.01 - 1e-9, (fp32["test"], bf16["test"])
    block = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576  # q,o + k,v (3 KV heads) + MLP + norms
    assert fp32["trainable_params"] == block + 576 + (576 * 2 + 2)  # + final norm + head


def test_minilm_last_two_blocks_learn_sst2(tmp_path):
    cfg = RunConfig(model="minilm-l6", task="sst2", method="last-2", train_limit=600, eval_limit=300,
                    out=str(tmp_path / "run"), train=TrainArgs(epochs=3, batch_size=16, lr=5e-4))
    r = train_run(cfg, progress=False)
    assert r["test"]["accuracy"] >= 0.72, r["test"]  # measured 0.773 (2026-11-23); chance is 0.5


def test_smollm2_greedy_equals_transformers_generate():
    import torch

    from peftlab.decode import generate
    from peftlab.generation import load_gen_task
    from peftlab.heads import LanguageModel
    from peftlab.models import load_backbone

    b = load_backbone("smollm2-135m")
    tok, m = b.tokenizer, LanguageModel(b.arch, b.tokenizer).eval()
    docs = load_gen_task("xsum").splits["test"]["text"][:8]
    texts = [f"Article: {d[:160 + 40 * i]}\nSummary:" for i, d in enumerate(docs)]  # varied lengths
    for batch_texts in (texts[:1], texts):  # batch 1, and a left-padded batch of 8
        batch = tok(batch_texts, padding=True, return_tensors="pt")
        ours = generate(m, batch["input_ids"], batch["attention_mask"], 12, pad_id=tok.pad_token_id)
        with torch.inference_mode():
            theirs = b.model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                      eos_token_id=None)[:, batch["input_ids"].shape[1]:]
        assert torch.equal(ours, theirs)


def test_smollm2_multitask_heads_on_a_frozen_backbone(tmp_path):
    """Scenario 2 of the multi-task issue on real data: one frozen SmolLM2, a CoLA and an SST-2
    head, trained from cached features."""
    cfg = RunConfig(model="smollm2-135m", task="cola,sst2", method="head", freeze="backbone", train_limit=300,
                    eval_limit=120, out=str(tmp_path / "run"), train=TrainArgs(epochs=10, batch_size=16))
    r = train_run(cfg, progress=False)
    assert r["cached_features"]["cut"] == -1 and r["trainable_params"] == 2 * (576 * 2 + 2)
    # measured 2026-11-23: SST-2 79.0, CoLA MCC 14.3 (300 train / 200 test rows per task, 10 epochs)
    assert r["test"]["sst2/accuracy"] >= 0.70 and r["test"]["cola/mcc"] >= 0.03, r["test"]
    assert r["test"]["sst2/accuracy"] > r["initial_validation"]["sst2/accuracy"] + 0.1
