"""No lost work: checkpoints, --resume, SIGKILL at any moment, non-finite losses.

The proven tolerance is exact: on CPU a resumed run ends with bit-identical weights, validation
history and test metrics (the checkpoint holds the weights, AdamW's moments, the scheduler, the
torch RNG and the position; batch plans are a function of seed and epoch).
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftlab.checkpoint import load_checkpoint
from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.lab import query
from peftlab.run import CHECKPOINT, METRICS, WEIGHTS, train_run
from peftlab.runconfig import RunConfig
from peftlab.saved import resume_run
from peftlab.train import TrainArgs, train
from tests.conftest import interrupt_run, write_toy_task

# LoRA dropout makes the run depend on the RNG; grad-accum 2 and save-every 3 put checkpoints
# mid-epoch, between accumulation groups' boundaries and epochs.
ARGS = ["--model", "tiny-llama", "--method", "lora", "--lora-dropout", "0.1", "--train-limit", "120",
        "--eval-limit", "40", "--epochs", "3", "--batch-size", "8", "--grad-accum", "2", "--save-every", "3",
        "--lr", "3e-3"]


def config(task: str, out: Path) -> RunConfig:
    from peftlab.methods import MethodArgs

    return RunConfig(model="tiny-llama", task=task, method="lora", train_limit=120, eval_limit=40, out=str(out),
                     method_args=MethodArgs(lora_dropout=0.1),
                     train=TrainArgs(epochs=3, batch_size=8, grad_accum=2, save_every=3, lr=3e-3))


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = json.loads((a / METRICS).read_text()), json.loads((b / METRICS).read_text())
    assert ra["test"] == rb["test"] and ra["best_epoch"] == rb["best_epoch"]
    for ea, eb in zip(ra["history"], rb["history"], strict=True):
        assert (ea["train_loss"], ea["val_loss"], ea["val"], ea["tokens"]) == \
               (eb["train_loss"], eb["val_loss"], eb["val"], eb["tokens"])
    assert not (b / CHECKPOINT).exists()  # a finished run keeps its record and best weights only


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, and its toy task folder."""
    root = tmp_path_factory.mktemp("resume")
    task = write_toy_task(root / "toy", (160, 40, 40))
    train_run(config(task, root / "ref"), progress=False)
    return task, root / "ref"


def test_interrupted_in_process_then_resumed_is_bit_identical(reference, tmp_path, monkeypatch):
    task, ref = reference
    out = tmp_path / "run"
    said = interrupt_run(monkeypatch, config(task, out), 10)  # between two checkpoints (steps 9 and 12): work is replayed
    _, state = load_checkpoint(out / CHECKPOINT)
    assert state["position"]["epoch"] == 1 and state["scheduler"]["last_epoch"] == 9  # 8 steps an epoch
    # step 9 was the first of epoch 2 (two batches a step): the message says where and how to go on
    assert said == f"the run is saved in '{out}' at epoch 2, batch 2: `peftlab train --resume {out}` continues from there"
    before = state["position"]["elapsed"]
    assert before > 0
    record = resume_run(out, progress=False)
    assert record["resumes"] == 1
    # times cover the earlier process's training too, not only the resumed part
    assert record["train_time_s"] > before and record["wall_time_s"] > record["train_time_s"]
    assert_same_run(ref, out)


def test_a_checkpoint_without_elapsed_time_still_counts_its_epochs(reference, tmp_path, monkeypatch):
    from peftlab.checkpoint import save_checkpoint

    task, _ = reference
    out = tmp_path / "run"
    interrupt_run(monkeypatch, config(task, out), 10)
    tensors, state = load_checkpoint(out / CHECKPOINT)
    del state["position"]["elapsed"]  # as checkpoints written before it was kept
    save_checkpoint(out / CHECKPOINT, tensors, state)
    record = resume_run(out, progress=False)
    assert record["train_time_s"] >= sum(record["time_per_epoch_s"])


def test_ctrl_c_before_the_first_checkpoint_says_the_run_starts_again(reference, tmp_path, monkeypatch):
    task, _ = reference
    out = tmp_path / "run"
    cfg = config(task, out)
    cfg.train.save_every = 0
    said = interrupt_run(monkeypatch, cfg, 2)
    assert said.startswith("nothing was saved before the first checkpoint") and f"--resume {out}`" in said
    assert not (out / CHECKPOINT).exists()


def test_an_interrupted_compare_continues_with_the_same_out(reference, tmp_path, monkeypatch, capsys):
    import peftlab.comparison as compare_module

    task, _ = reference
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "tiny-llama", "--task", task, "--methods", "head,lora", "--epochs", "2",
            "--train-limit", "60", "--eval-limit", "40", "--save-every", "2", "--out", str(out)]
    real, calls = compare_module.train_run, []

    def stopped(cfg, **kw):  # Ctrl-C in the second method's first epoch
        calls.append((cfg.method, kw["resume"]))
        if cfg.method == "lora" and not kw["resume"]:
            interrupt_run(monkeypatch, cfg, 3)
            raise KeyboardInterrupt
        return real(cfg, **kw)
    monkeypatch.setattr(compare_module, "train_run", stopped)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted; the runs so far are in '{out}'; the same compare with --out {out} continues" in err
    assert (out / "lora" / CHECKPOINT).is_file() and (out / "head" / METRICS).is_file()
    assert main(argv) == 0
    assert calls == [("head", False), ("lora", False), ("lora", True)]  # head kept, lora resumed
    assert json.loads((out / "lora" / METRICS).read_text())["resumes"] == 1
    assert "finished before: kept" in capsys.readouterr().err
    assert main([*argv, "--lr", "0.01"]) == 2  # other settings into the same --out would mix two compares
    assert f"'{out}' holds a compare run with other settings (head, lora" in capsys.readouterr().err
    monkeypatch.setattr(compare_module, "train_run", real)
    assert main([a if a != "head,lora" else "head" for a in argv]) == 0  # fewer methods: the index follows
    assert [r["method"] for r in query(out)] == ["head"] and "lora" not in (out / "report.md").read_text()


# Runs `peftlab train` in a child process that SIGKILLs itself at a chosen moment:
#   step:N   before the N-th optimizer step
#   write:N  in the middle of the N-th checkpoint write (half of the temp file written)
#   val:N    during the N-th validation
CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    import peftlab.checkpoint as ck
    import peftlab.run as run
    from peftlab.cli import main

    kind, n = (os.environ.get("KILL_AT") or ":0").split(":")
    n, count = int(n), [0]

    def hit():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "step":
        step = torch.optim.AdamW.step
        torch.optim.AdamW.step = lambda self, *a, **k: (hit(), step(self, *a, **k))[1]
    elif kind == "write":
        save_file = ck.save_file
        def half_then_die(data, path, metadata=None):
            save_file(data, path, metadata=metadata)
            if count[0] + 1 == n:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
            hit()
        ck.save_file = half_then_die
    elif kind == "val":
        evaluate = run.evaluate_split
        run.evaluate_split = lambda *a, **k: (hit(), evaluate(*a, **k))[1]
    sys.exit(main(sys.argv[1:]))
""")


def child(argv: list[str], kill_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "KILL_AT": kill_at or ""}
    return subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def assert_loadable(out: Path) -> None:
    """What a kill leaves behind: no checkpoint yet, or one that loads."""
    if (out / CHECKPOINT).exists():
        tensors, state = load_checkpoint(out / CHECKPOINT)
        assert "rng.torch" in tensors and state["position"]["epoch"] <= 3


def test_sigkill_at_chosen_points_then_resume_is_bit_identical(reference, tmp_path):
    task, ref = reference
    out = tmp_path / "run"
    train = ["train", *ARGS, "--task", task, "--out", str(out)]
    resume = ["train", "--resume", str(out)]
    # step 5 (epoch 1, mid-way), the 4th checkpoint write (the epoch-1 one), the 2nd validation
    # (epoch 2's, its batches done), step 20 (epoch 3)
    for argv, kill in ((train, "step:5"), (resume, "write:2"), (resume, "val:1"), (resume, "step:6")):
        p = child(argv, kill)
        _, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, err
        assert_loadable(out)
    p = child(resume)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert json.loads((out / METRICS).read_text())["resumes"] >= 1
    assert_same_run(ref, out)


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(reference, tmp_path):
    task, _ = reference
    # batch 4 and a checkpoint every step: 120 steps of ~2 s, most of it inside checkpoint writes
    args = [*ARGS[:ARGS.index("--batch-size")], "--batch-size", "4", "--lr", "3e-3", "--task", task]
    assert main(["train", *args, "--save-every", "0", "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "run"
    rng, killed = random.Random(7), 0
    for _ in range(4):
        before = (out / CHECKPOINT).stat().st_mtime_ns if (out / CHECKPOINT).exists() else None
        p = child(["train", *args, "--save-every", "1", "--out", str(out)] if before is None
                  else ["train", "--resume", str(out)])
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline and \
                (not (out / CHECKPOINT).exists() or (out / CHECKPOINT).stat().st_mtime_ns == before):
            time.sleep(0.02)  # wait for the child's first checkpoint: then kill at a random moment
        time.sleep(rng.uniform(0.0, 1.0))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        killed += p.returncode == -signal.SIGKILL
        if (out / METRICS).exists():
            break
        assert_loadable(out)
    assert killed >= 1
    if not (out / METRICS).exists():
        p = child(["train", "--resume", str(out)])
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    # checkpoints every step or none: the same run
    assert_same_run(tmp_path / "ref", out)


def test_resume_refuses_other_flags_and_finished_runs(reference, tmp_path, capsys):
    task, ref = reference
    assert main(["train", "--resume", str(ref), "--epochs", "5"]) == 2
    assert "give no other flags" in capsys.readouterr().err
    assert main(["train", "--resume", str(ref)]) == 2
    assert "is a finished run; nothing to resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x)


def test_non_finite_loss_saves_then_stops_naming_the_step(tmp_path):
    model, x, y = Tiny(), torch.randn(32, 4), torch.randint(0, 2, (32,))
    calls = {"n": 0}

    def batch_loss(idx):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        return (loss * float("nan") if calls["n"] == 3 else loss), len(idx)

    saved = []
    args = TrainArgs(epochs=1, batch_size=4, bucket=False)
    with pytest.raises(PeftlabError, match=r"the loss became nan at step 3 \(epoch 1, batch 3\); the state "
                                           r"before that step is saved: .* --skip-nonfinite true"):
        train(model, torch.ones(32).numpy(), batch_loss, lambda: ({"accuracy": 0.0}, 0.0), args, lr=1e-2, seed=0,
              metric="accuracy", progress=False, save=saved.append)
    tensors, state = saved[-1]
    assert state["position"]["batch"] == 2 and state["scheduler"]["last_epoch"] == 2
    assert torch.equal(tensors["param.head.weight"], model.head.weight)  # the bad step changed nothing


def test_skip_nonfinite_skips_bad_batches_and_finishes():
    model, x, y = Tiny(), torch.randn(32, 4), torch.randint(0, 2, (32,))
    calls = {"n": 0}

    def batch_loss(idx):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        return (loss * float("inf") if calls["n"] in (2, 5) else loss), len(idx)

    args = TrainArgs(epochs=2, batch_size=4, bucket=False, skip_nonfinite=True)
    end = train(model, torch.ones(32).numpy(), batch_loss, lambda: ({"accuracy": 0.0}, 0.0), args, lr=1e-2,
                seed=0, metric="accuracy", progress=False)
    assert end.skipped == 2 and len(end.history) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_full_disk_and_unwritable_folders_are_refused_up_front(reference, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    task, _ = reference
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    assert main(["train", *ARGS, "--task", task, "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "MiB free" in err and err.count("\n") == 1
    monkeypatch.undo()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", *ARGS, "--task", task, "--out", str(blocker / "run")]) == 2  # even root cannot
    assert "cannot write to run directory" in capsys.readouterr().err


def test_a_run_stopped_by_a_non_finite_loss_resumes_past_it_with_skip_nonfinite(reference, tmp_path, monkeypatch,
                                                                               capsys):
    import peftlab.run

    task, _ = reference
    out, real = tmp_path / "run", peftlab.run.batch_loss_fn
    poisoned = []  # the rows of the fifth batch: nan for them in every attempt, as bad data would be

    def batch_loss_fn(p):
        inner = real(p)

        def loss(idx):
            if len(poisoned) < 5:
                poisoned.append(sorted(idx.tolist()))
            value, n = inner(idx)
            return (value * float("nan") if poisoned[4:] == [sorted(idx.tolist())] else value), n
        return loss
    monkeypatch.setattr(peftlab.run, "batch_loss_fn", batch_loss_fn)
    args = ["train", "--model", "tiny-llama", "--task", task, "--method", "lora", "--train-limit", "120",
            "--eval-limit", "40", "--epochs", "1", "--batch-size", "8", "--save-every", "2", "--out", str(out)]
    assert main(args) == 2
    assert "--resume RUN_DIR --skip-nonfinite true` continues from it" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--lr", "1e-5"]) == 2  # other settings stay those saved
    assert "no other flags but --nproc and --skip-nonfinite true" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--skip-nonfinite", "true"]) == 0
    record = json.loads((out / METRICS).read_text())
    assert record["skipped_batches"] == 1 and record["resumes"] == 1
