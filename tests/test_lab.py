import json
import re
import sqlite3

import pytest

from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.lab import INDEX, Experiment, query, resolve, run_experiment


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_the_grid_expands_over_the_defaults(tmp_path):
    exp = Experiment.load(write(tmp_path / "e.yaml", """
name: g
defaults: {model: tiny-llama, task: sst2, epochs: 2, lora_r: 4, temperature: 0.5}
grid: {method: [head, lora], seed: [0, 1, 2], lr: [0.001, 0.01]}
"""))
    cells = exp.cells(tmp_path / "out")
    assert len(cells) == 12 and len({c.id for c in cells}) == 12
    c = cells[0]
    assert c.params == {"method": "head", "seed": 0, "lr": 0.001}
    assert (c.config.train.epochs, c.config.train.lr, c.config.method_args.lora_r, c.config.decoding.temperature) \
        == (2, 0.001, 4, 0.5)
    assert c.run_dir.parent == tmp_path / "out" / "runs"
    assert [x.id for x in exp.cells(tmp_path / "out")] == [x.id for x in cells]  # stable names


@pytest.mark.parametrize("text,message", [
    ("grid: {method: [head], colour: [1]}", "unknown setting"),
    ("grid: {method: head}", "non-empty list"),
    ("grid: {method: [nope]}", "unknown method"),
    ("defaults: [1, 2]", "needs a mapping"),
])
def test_bad_experiment_files_fail_before_running(tmp_path, text, message):
    with pytest.raises(PeftlabError, match=message):
        Experiment.load(write(tmp_path / "e.yaml", text)).cells(tmp_path)


def test_an_interrupted_experiment_resumes_and_the_index_matches_the_records(toy_task, tmp_path, monkeypatch):
    path = write(tmp_path / "e.yaml", f"""
name: toy
defaults: {{model: tiny-gpt2, task: {toy_task}, epochs: 1, train_limit: 60, eval_limit: 40}}
grid: {{method: [head, last-1, bias], seed: [0]}}
""")
    import peftlab.lab
    import peftlab.run

    real, calls = peftlab.lab.train_run, []
    evaluate = peftlab.run.evaluate_split

    def killed_in_validation(*a, **k):  # the second cell dies as a killed process would, its batches done
        raise KeyboardInterrupt

    def interrupted(cfg, progress, resume, **kw):
        calls.append(cfg.method)
        monkeypatch.setattr(peftlab.run, "evaluate_split", killed_in_validation if cfg.method == "last-1" else evaluate)
        return real(cfg, progress=progress, resume=resume, **kw)
    monkeypatch.setattr(peftlab.lab, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt, match=re.escape(f"`peftlab run {path} --out {tmp_path / 'exp'}` continues")):
        run_experiment(path, tmp_path / "exp", progress=False)
    assert calls == ["head", "last-1"]
    monkeypatch.setattr(peftlab.run, "evaluate_split", evaluate)
    monkeypatch.setattr(peftlab.lab, "train_run", lambda cfg, progress, resume, **kw: (
        calls.append(cfg.method), real(cfg, progress=progress, resume=resume, **kw))[1])
    rows = run_experiment(path, tmp_path / "exp", progress=False)
    assert calls == ["head", "last-1", "last-1", "bias"]  # head was not re-run
    assert [r["resumes"] for r in map(lambda r: json.loads(r["record"]), rows) if r["method"] == "last-1"] == [1]
    assert sorted(r["method"] for r in rows) == ["bias", "head", "last-1"] and {r["status"] for r in rows} == {"done"}
    for r in rows:  # every index row says what the run's own record says
        record = json.loads((tmp_path / "exp" / "runs" / r["id"] / "metrics.json").read_text())
        assert r["value"] == record["test"][record["metric"]] and r["trainable_params"] == record["trainable_params"]
        assert r["adapter_bytes"] == (tmp_path / "exp" / "runs" / r["id"] / "trainable.safetensors").stat().st_size
    n = sqlite3.connect(tmp_path / "exp" / INDEX).execute("SELECT count(*) FROM runs").fetchone()[0]
    assert n == 3
    calls.clear()
    run_experiment(path, tmp_path / "exp", progress=False)
    assert calls == []  # all finished: nothing runs
    assert [r["method"] for r in query(tmp_path / "exp", ["method=bias"])] == ["bias"]
    assert len(query(tmp_path / "exp", ["seed=0"])) == 3 and query(tmp_path / "exp", ["seed=1"]) == []  # numbers
    best = query(tmp_path / "exp", sort="metric")
    assert [r["value"] for r in best] == sorted((r["value"] for r in best), reverse=True)
    (tmp_path / "exp").rename(tmp_path / "moved")
    run_experiment(path, tmp_path / "moved", progress=False)
    assert calls == []  # a moved experiment keeps its finished cells


def test_a_failing_cell_is_recorded_and_the_rest_run(toy_task, tmp_path, capsys):
    path = write(tmp_path / "e.yaml", f"""
defaults: {{model: tiny-llama, task: {toy_task}, epochs: 1, train_limit: 40, eval_limit: 20}}
grid: {{method: [head], lr: [-1.0, 0.01]}}
""")
    with pytest.raises(PeftlabError, match="--lr must be positive"):  # caught while expanding: nothing ran
        run_experiment(path, tmp_path / "exp", progress=False)
    path = write(tmp_path / "e.yaml", f"""
defaults: {{model: tiny-llama, task: {toy_task}, epochs: 1, train_limit: 40, eval_limit: 20}}
grid: {{method: [head], text_column: [nope, text]}}
""")
    assert main(["run", path, "--out", str(tmp_path / "exp2")]) == 0
    rows = {r["params"]: r for r in query(tmp_path / "exp2")}
    assert rows['{"method": "head", "text_column": "nope"}']["status"] == "failed"
    assert "nope" in rows['{"method": "head", "text_column": "nope"}']["error"]
    assert rows['{"method": "head", "text_column": "text"}']["status"] == "done"
    assert main(["runs", str(tmp_path / "exp2"), "--where", "status=failed"]) == 0
    assert "1 runs" in capsys.readouterr().out


def test_resolve_refuses_unknown_keys():
    with pytest.raises(PeftlabError, match="unknown setting"):
        resolve({"modle": "x"})


def test_several_grids_give_the_union_of_their_cells(tmp_path):
    exp = Experiment.load(write(tmp_path / "e.yaml", """
defaults: {model: tiny-llama, task: sst2}
grid:
  - {method: [lora], lora_r: [2, 4, 8]}
  - {method: [prompt, lora], virtual_tokens: [10]}
"""))
    cells = exp.cells(tmp_path)
    assert [c.params for c in cells] == [{"method": "lora", "lora_r": 2}, {"method": "lora", "lora_r": 4},
                                         {"method": "lora", "lora_r": 8}, {"method": "prompt", "virtual_tokens": 10},
                                         {"method": "lora", "virtual_tokens": 10}]


def test_report_of_a_small_experiment(toy_task, tmp_path, capsys):
    from peftlab.report import pareto, smooth, sweeps

    path = write(tmp_path / "e.yaml", f"""
name: small
defaults: {{model: tiny-gpt2, task: {toy_task}, epochs: 2, train_limit: 60, eval_limit: 40}}
grid:
  - {{method: [head, full], seed: [0, 1]}}
  - {{method: [lora], lr: [0.001, 0.003, 0.01]}}
""")
    assert main(["run", path, "--out", str(tmp_path / "exp")]) == 0
    assert "report:" in capsys.readouterr().out
    exp = tmp_path / "exp"
    pngs = sorted(p.name for p in (exp / "plots").glob("*.png"))
    assert pngs == ["losses.png", "metric.png", "pareto.png", "sweep_lr.png"]
    for p in (exp / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    page = (exp / "report.html").read_text()
    for row in query(exp):
        assert row["id"] in page
    assert page.count("data:image/png;base64,") == 4 and "Cost relative to full fine-tuning" in page
    md = (exp / "report.md").read_text()
    assert "± " in md and "plots/pareto.png" in md
    assert pareto([(10, 0.5), (5, 0.6), (20, 0.7), (8, 0.4)]) == [1, 2]
    assert smooth([4.0, 2.0, 0.0, 2.0], 2).tolist() == [4.0, 3.0, 1.0, 1.0]  # the loss plot's moving average
    two = [{"settings": {"model": "m", "task": "t", "method": "lora", "bucket": b, "lora_r": r}}
           for b, r in ((True, 4), (False, 8))]
    assert list(sweeps(two)) == ["lora_r"]  # two numbers make a sweep; on/off settings do not
    machine = md.split("machine: ")[1].splitlines()[0]
    assert "CPUs" in machine and "{" not in machine  # one plain line, not a dict's repr


@pytest.mark.parametrize("name", ["spam_methods", "few_shot", "xsum", "multitask"])
def test_the_ready_made_experiments_expand(name, tmp_path):
    from pathlib import Path

    exp = Experiment.load(Path(__file__).parents[1] / "experiments" / f"{name}.yaml")
    cells = exp.cells(tmp_path)
    assert cells and len({c.id for c in cells}) == len(cells)


def test_in_context_cells_run_beside_trained_ones(toy_task, tmp_path):
    path = write(tmp_path / "e.yaml", f"""
defaults: {{model: tiny-llama, task: {toy_task}, epochs: 1, train_limit: 40, eval_limit: 30}}
grid:
  - {{method: [head]}}
  - {{method: [icl], shots: [0, 2]}}
""")
    rows = run_experiment(path, tmp_path / "exp", progress=False)
    icl = sorted((json.loads(r["params"]).get("shots"), r) for r in rows if r["method"] == "icl")
    assert [k for k, _ in icl] == [0, 2] and all(r["status"] == "done" for _, r in icl)
    assert all(r["trainable_params"] == 0 and 0 <= r["value"] <= 1 for _, r in icl)
    assert all(r["s_per_epoch"] is None and r["tokens_per_s"] is None for _, r in icl)  # no epochs: no times
    from peftlab.report import write_report

    md, page = write_report(tmp_path / "exp")
    assert "icl, shots=2" in md.read_text()
    icl_row = next(x for x in md.read_text().splitlines() if x.startswith("| icl, shots=2 |"))
    assert icl_row.split(" | ")[8:10] == ["-", "-"]  # s/epoch and tok/s: nothing trained
    assert (tmp_path / "exp" / "plots" / "sweep_shots.png").is_file()  # two values make a sweep


def test_report_rows_are_mean_and_sample_std_over_seeds():
    from peftlab.report import group

    def row(seed: int, value: float) -> dict:
        return {"id": f"r{seed}", "model": "m", "task": "t", "params": json.dumps({"method": "lora", "seed": seed}),
                "metric": "accuracy", "value": value, "trainable_params": 1, "trainable_pct": 0.1,
                "peak_memory_mb": 1.0, "s_per_epoch": 1.0, "tokens_per_s": 1.0, "adapter_bytes": 1, "record": "{}"}
    (g,) = group([row(0, 0.8), row(1, 0.9), row(2, 0.7)])
    assert g["n"] == 3 and g["mean"] == pytest.approx(80.0) and g["std"] == pytest.approx(10.0)  # n-1: 10, not 8.2
    assert group([row(0, 0.8)])[0]["std"] == 0.0


def test_cost_is_relative_to_full_fine_tuning_of_the_same_model_and_task():
    from peftlab.report import cost_table, group

    def row(model: str, task: str, method: str, s: float, mem: float, test_s: float) -> dict:
        return {"id": f"{model}-{task}-{method}", "model": model, "task": task, "params": json.dumps({"method": method}),
                "metric": "accuracy", "value": 0.5, "trainable_params": 1, "trainable_pct": 0.1,
                "peak_memory_mb": mem, "s_per_epoch": s, "tokens_per_s": 1.0, "adapter_bytes": 1,
                "record": json.dumps({"test_time_s": test_s})}
    groups = group([row("a", "t", "full", 10, 1000, 4), row("a", "t", "lora", 5, 250, 1),
                    row("b", "t", "full", 40, 2000, 8), row("b", "t", "lora", 10, 1000, 2),
                    row("a", "u", "lora", 1, 1, 1)])  # no full run for task u: no row
    _, rows = cost_table(groups)
    by = {(g["settings"]["model"], g["label"]): r for g, r in zip([g for g in groups if g["settings"]["task"] == "t"], rows)}
    assert by["a", "lora"][2:] == ["0.50x", "0.25x", "0.25x"]
    assert by["b", "lora"][2:] == ["0.25x", "0.25x", "0.50x"] and by["b", "full"][2:] == ["1.00x"] * 3
    assert len(rows) == 4


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 as text; an experiment means the number."""
    path = write(tmp_path / "e.yaml", "defaults: {model: tiny-gpt2, head_lr: 5e-3}\ngrid: {method: [lora], lr: [1e-3, 3E-4]}\n")
    cells = Experiment.load(path).cells(tmp_path / "exp")
    assert [c.config.train.lr for c in cells] == [0.001, 0.0003] and cells[0].config.train.head_lr == 0.005


def test_a_run_on_relative_paths_reads_back_from_elsewhere(tmp_path, monkeypatch):
    """config.json holds absolute data paths: `peftlab eval` works from another folder, and an
    experiment re-run from the first folder still sees its finished cell as the same config."""
    from tests.conftest import write_toy_task

    write_toy_task(tmp_path / "work" / "toy", (40, 10, 10))
    monkeypatch.chdir(tmp_path / "work")
    path = write(tmp_path / "work" / "e.yaml", "defaults: {model: tiny-llama, task: toy, epochs: 1, cache_features: off, bucket: on}\n"
                                               "grid: [{method: [head]}, {method: [icl], shots: [0]}]\n")
    rows = run_experiment(path, tmp_path / "work" / "exp", progress=False)
    run = tmp_path / "work" / "exp" / "runs" / next(r["id"] for r in rows if r["method"] == "head")
    saved = json.loads((run / "config.json").read_text())
    assert saved["task"] == str(tmp_path / "work" / "toy")
    assert run_experiment(path, tmp_path / "work" / "exp", progress=False) == rows  # both finished: none re-run
    (run / "config.json").write_text(json.dumps({**saved, "task": "toy"}))  # as saved before paths were absolute
    assert run_experiment(path, tmp_path / "work" / "exp", progress=False) == rows
    monkeypatch.chdir(tmp_path)
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["eval", str(run)]) == 0


def test_portable_paths_keep_a_symlinked_task_s_name(tmp_path, monkeypatch):
    from peftlab.runconfig import RunConfig

    (tmp_path / "v3").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "v3")
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(task="current,sst2", model="tiny-gpt2").portable()
    assert cfg.task == f"{tmp_path / 'current'},sst2" and cfg.model == "tiny-gpt2"  # the name heads are keyed by


def test_settings_a_sweep_gives_to_methods_that_ignore_them_are_named(tmp_path):
    path = write(tmp_path / "e.yaml", "defaults: {model: tiny-gpt2, virtual_tokens: 5}\n"
                                      "grid: {method: [head, lora], lora_r: [4, 16]}\n")
    with pytest.warns(UserWarning) as caught:
        Experiment.load(path).cells(tmp_path / "exp")
    assert sorted(str(w.message) for w in caught) == [
        "experiment 'e': 'lora_r' is swept over method(s) head, which do not use it: those cells repeat one run",
        "experiment 'e': 'virtual_tokens' in defaults is used by none of its methods"]
