import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.lab import query
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.saved import eval_run
from peftlab.train import TrainArgs, lr_lambda


def test_a_tiny_model_learns_a_toy_task(toy_task, tmp_path):
    cfg = RunConfig(model="tiny-llama", task=toy_task, method="full", out=str(tmp_path / "run"),
                    train=TrainArgs(epochs=4, batch_size=16, lr=3e-3))
    r = train_run(cfg, progress=False)
    assert r["test"]["accuracy"] >= 0.95, r["test"]
    assert r["trainable_params"] == r["total_params"] and r["trainable_pct"] == 100
    assert len(r["history"]) == 4 and r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
    # the saved run reloads and evaluates to the same test metrics
    assert eval_run(tmp_path / "run")["accuracy"] == pytest.approx(r["test"]["accuracy"])


def test_runs_are_deterministic(toy_task, tmp_path):
    def run(out):
        cfg = RunConfig(model="tiny-gpt2", task=toy_task, method="last-1", out=str(out), train_limit=100,
                        train=TrainArgs(epochs=1, batch_size=8, lr=1e-3))
        train_run(cfg, progress=False)
        return load_file(str(out / "trainable.safetensors"))
    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_averages_each_group_over_its_own_batches():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from peftlab.train import train

    torch.manual_seed(0)
    model, x, y = torch.nn.Module(), torch.randn(12, 4), torch.randint(0, 2, (12,))
    model.head = torch.nn.Linear(4, 2)  # train() gives the head its own learning rate
    plan = [torch.arange(i, i + 4).numpy() for i in (0, 4, 8)]  # groups of 2: [b0, b1], then b2 alone
    grads = []
    hook = register_optimizer_step_pre_hook(lambda opt, *_: grads.append(model.head.weight.grad.clone()))
    args = TrainArgs(epochs=1, batch_size=4, grad_accum=2, max_grad_norm=0, warmup_ratio=0, head_lr=1e-9,
                     precision="fp32")
    try:
        train(model, torch.ones(12).numpy(), lambda i: (F.cross_entropy(model.head(x[i]), y[i]), len(i)),
              lambda: ({"accuracy": 0.0}, 0.0), args, lr=1e-9, seed=0, metric="accuracy", progress=False,
              plan=lambda epoch: plan)
    finally:
        hook.remove()
    model.zero_grad()
    F.cross_entropy(model.head(x[8:]), y[8:]).backward()
    assert len(grads) == 2
    torch.testing.assert_close(grads[1], model.head.weight.grad, rtol=1e-4, atol=1e-6)  # the short group: not halved
    model.zero_grad()
    F.cross_entropy(model.head(x[:8]), y[:8]).backward()  # a full group: the mean over its two batches
    torch.testing.assert_close(grads[0], model.head.weight.grad, rtol=1e-4, atol=1e-6)


def test_train_per_class_takes_k_seeded_rows_of_each_label(toy_task):
    from peftlab.run import prepare

    def rows(seed: int) -> list[list[int]]:
        p = prepare(RunConfig(model="tiny-gpt2", task=toy_task, method="head", train_per_class=3, seed=seed))
        labels = p.data["train"].labels
        assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
        return p.data["train"].input_ids
    assert rows(0) == rows(0) and rows(0) != rows(1)


def test_only_matrices_are_weight_decayed_and_the_head_has_its_own_lr():
    from peftlab.train import make_optimizer

    m = torch.nn.Module()
    m.body, m.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    opt = make_optimizer(m, lr=1e-3, head_lr=1e-2, weight_decay=0.1)
    got = {id(p): (g["weight_decay"], g["lr"]) for g in opt.param_groups for p in g["params"]}
    assert got[id(m.body.weight)] == (0.1, 1e-3) and got[id(m.body.bias)] == (0.0, 1e-3)
    assert got[id(m.head.weight)] == (0.1, 1e-2) and got[id(m.head.bias)] == (0.0, 1e-2)


def test_the_fused_optimizer_steps_as_the_per_tensor_adamw():
    from peftlab.train import make_optimizer

    torch.manual_seed(0)
    nets = []
    for _ in range(2):
        m = torch.nn.Module()
        m.body, m.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
        nets.append(m)
    nets[1].load_state_dict(nets[0].state_dict())
    fused = make_optimizer(nets[0], lr=1e-2, head_lr=1e-1, weight_decay=0.1)
    loop = torch.optim.AdamW([{k: v for k, v in g.items() if k != "fused"} for g in
                              make_optimizer(nets[1], lr=1e-2, head_lr=1e-1, weight_decay=0.1).param_groups])
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    start = [p.detach().clone() for p in nets[0].parameters()]
    x = torch.randn(16, 8)
    for _ in range(5):
        for m, opt in zip(nets, (fused, loop)):
            m.head(torch.tanh(m.body(x))).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b, a0 in zip(nets[0].parameters(), nets[1].parameters(), start):
        assert (a - a0).abs().min() > 1e-4  # every weight moved: steps that did nothing would agree too
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_warms_up_then_decays():
    f = lr_lambda("linear", warmup=2, total=10)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_lambda("cosine", 0, 10)(2) == pytest.approx(0.5 * (1 + math.cos(0.2 * math.pi)))  # 0.905; linear: 0.8
    assert lr_lambda("constant", 2, 10)(7) == 1.0


def test_cli_train_eval_and_compare(toy_task, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--model", "tiny-bert", "--task", toy_task, "--method", "last-block+norm",
                 "--epochs", "1", "--lr", "1e-3", "--out", str(out)]) == 0
    assert {"config.json", "metrics.json", "trainable.safetensors", "predictions.jsonl"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test", "trainable_params", "total_params", "wall_time_s", "time_per_epoch_s", "tokens_per_s",
            "peak_memory_mb"} <= set(metrics)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]  # label names, per row
    assert len(preds) == metrics["test_rows"] and all(x["input"] for x in preds)
    assert sum(x["output"] == x["reference"] for x in preds) / len(preds) == pytest.approx(metrics["test"]["accuracy"])
    val = metrics["history"][0]["val"][metrics["metric"]]  # the epoch line in %, as the table below it
    assert f"val {metrics['metric']} {100 * val:.1f}  (" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", str(out), "--split", "validation"]) == 0  # one epoch: the best epoch's validation
    assert capsys.readouterr().out.startswith(  # in %, as every table shows it
        f"validation (100 rows, metrics in %): accuracy {100 * metrics['validation']['accuracy']:.1f}")
    assert main(["compare", "--model", "tiny-gpt2", "--task", toy_task, "--methods", "head,last-1",
                 "--epochs", "1", "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "head" in table and "last-1" in table and (tmp_path / "cmp" / "compare.md").is_file()
    page = (tmp_path / "cmp" / "report.html").read_text()  # the runs indexed and reported as an experiment's
    assert page.count("data:image/png;base64,") == 3 and "last-1" in page
    assert sorted(r["method"] for r in query(tmp_path / "cmp", ["status=done"])) == ["head", "last-1"]


@pytest.mark.parametrize("argv,message", [
    (["train", "--model", "nope"], "unknown model 'nope'; valid: smollm2-135m"),
    (["train", "--task", "sst3"], "unknown task 'sst3'; valid: sst2"),
    (["train", "--method", "lora-typo"], "unknown method 'lora-typo'; valid: full, head"),
    (["train", "--epochs", "0"], "--epochs must be at least 1"),
    (["compare", "--methods", "head,nope"], "unknown method 'nope'"),
    (["eval", "/no/such/run"], "run directory '/no/such/run' does not exist"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] != "eval" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_a_diverging_run_stops_with_a_clear_error(toy_task, tmp_path):
    from peftlab.errors import PeftlabError

    cfg = RunConfig(model="tiny-gpt2", task=toy_task, method="full", out=str(tmp_path / "r"),
                    train=TrainArgs(epochs=1, lr=1e30, head_lr=1e30, max_grad_norm=0, warmup_ratio=0))
    with pytest.raises(PeftlabError, match=r"the loss became .* at step \d+ \(epoch 1, batch"):
        train_run(cfg, progress=False)


def test_tensorboard_logs_steps_and_epochs(toy_task, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = RunConfig(model="tiny-llama", task=toy_task, method="head", out=str(tmp_path / "run"), train_limit=64,
                    eval_limit=20, tensorboard=True, train=TrainArgs(epochs=2, batch_size=16))
    train_run(cfg, progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "epoch/val_loss", "val/accuracy"} <= set(tags)
    assert len(acc.Scalars("train/loss")) == 8 and len(acc.Scalars("val/accuracy")) == 2  # 4 steps x 2 epochs


def test_test_predictions_without_information_are_warned_about(toy_task, tmp_path, monkeypatch):
    import peftlab.run

    real = peftlab.run.evaluate_split

    def one_class(p, cfg, split, **kw):  # as a model that gives every test row the same class scores
        metrics, loss, outputs = real(p, cfg, split, **kw)
        return ({**metrics, "accuracy": 0.5, "mcc": 0.0} if split == "test" else metrics), loss, outputs
    monkeypatch.setattr(peftlab.run, "evaluate_split", one_class)
    cfg = RunConfig(model="tiny-gpt2", task=toy_task, method="head", train_limit=60, eval_limit=40,
                    out=str(tmp_path / "r"), train=TrainArgs(epochs=1))
    with pytest.warns(UserWarning, match=r"carry no information about the labels \(MCC 0, accuracy 50.0%\).*"
                                         r"--head label-words"):
        train_run(cfg, progress=False)


def test_without_a_terminal_training_prints_a_line_every_tenth_of_an_epoch(toy_task, tmp_path, capsys):
    cfg = RunConfig(model="tiny-gpt2", task=toy_task, method="last-1", out=str(tmp_path / "r"),
                    train=TrainArgs(epochs=1, batch_size=8))  # 400 rows: 50 batches; pytest's output is no tty
    train_run(cfg)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1/1: batch")]
    assert [int(x.split()[3].split("/")[0]) for x in lines] == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert all("train loss" in x and "tok/s" in x and "epoch ETA" in x for x in lines)
