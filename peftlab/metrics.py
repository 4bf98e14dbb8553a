"""Task metrics. Classification (scikit-learn) as fractions in [0, 1] (MCC in [-1, 1]);
generation as percentages: ROUGE F-measure x100 (rouge-score, stemming on), exact match and
token F1 x100 with SQuAD's answer normalisation, and the mean generated length in words.
"""

import re
import string
from collections import Counter

import numpy as np

METRICS = ("accuracy", "macro_f1", "mcc")
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "gen_words")


def percent(metric: str, value: float) -> float:
    """A metric in the unit every table and log line shows: classification fractions (and MCC,
    multi-task 'task/metric' and 'combined') x100; generation metrics are x100 already."""
    return value if metric.rsplit("/", 1)[-1] in GENERATION_METRICS else 100 * value


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef  # 1.3 s to import: only when scoring

    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)) if len(set(labels.tolist())) > 1 else 0.0,
    }


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L, exact match, token F1 (all x100) and the mean generated length in words."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need as many predictions as references (got {len(preds)} and {len(refs)})")
    from rouge_score import rouge_scorer  # here: it imports nltk (~0.5 s), which classification never needs

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p) for p, r in zip(preds, refs)]
    mean = lambda xs: 100 * float(np.mean(xs))
    return {
        **{k: mean([s[k].fmeasure for s in rouge]) for k in ("rouge1", "rouge2", "rougeL")},
        "exact_match": mean([normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)]),
        "token_f1": mean([token_f1(p, r) for p, r in zip(preds, refs)]),
        "gen_words": float(np.mean([len(p.split()) for p in preds])),
    }
