import numpy as np
import pytest

from peftlab.metrics import classification_metrics, generation_metrics, normalize_answer, percent, token_f1


def test_classification_metrics():
    m = classification_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    assert m["accuracy"] == 0.75 and m["mcc"] == pytest.approx(0.5773, abs=1e-4)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # per-class F1 0.8 and 0.667: macro, not micro


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Kitchen!") == "kitchen"
    assert token_f1("the red ball", "a ball") == pytest.approx(2 * 0.5 * 1 / 1.5)
    m = generation_metrics(["The kitchen.", "garden", ""], ["kitchen", "hallway", ""])
    assert m["exact_match"] == pytest.approx(200 / 3)
    assert m["token_f1"] == pytest.approx(200 / 3)


def test_rouge_is_stemmed_f_measure_times_100():
    m = generation_metrics(["the cats were running home"], ["the cat runs home"])
    # stemmed tokens: the cat were run home / the cat run home -> 4 common, P = 4/5, R = 1
    assert m["rouge1"] == pytest.approx(100 * 2 * 0.8 / 1.8)
    assert m["rougeL"] == pytest.approx(m["rouge1"]) and m["gen_words"] == 5
    assert generation_metrics(["a b c"], ["a b c"])["rouge2"] == 100


def test_every_metric_is_shown_in_one_unit():
    assert percent("macro_f1", 0.756) == pytest.approx(75.6) and percent("mcc", -0.5) == -50.0
    assert percent("cola/mcc", 0.25) == 25.0 and percent("combined", 0.5) == 50.0  # multi-task
    assert percent("rougeL", 31.2) == 31.2 and percent("xsum/rougeL", 31.2) == 31.2  # x100 already
    assert percent("gen_words", 12.0) == 12.0
