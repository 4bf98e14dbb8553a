"""The benchmarks are not tests (no timings here), but they must keep running: every script in
bench/ imports (the peftlab names it uses still exist) and answers --help (its options build)."""

import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "bench")]))


def test_every_benchmark_is_found():
    assert {"train_step", "sst2_epoch", "decode_vs_generate", "cached_features"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_benchmark_imports_and_answers_help(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"bench.{name}", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out
