#!/usr/bin/env python3
"""Run LongBench v1's official scoring code on conformance cases (kvc's tests/score_conformance.rs).

The metric functions and the two scorers below are LongBench's `metrics.py` and `eval.py`
(THUDM/LongBench 2e00731, LongBench/metrics.py + LongBench/eval.py) reproduced verbatim, only
re-indented into this file; they use the PyPI packages rouge 1.0.1, jieba 0.42.1 and
fuzzywuzzy 0.18.0 (installed by scripts/conformance-venv.sh). Nothing here is kvc's own logic.

Input: JSON lines on stdin, one case each:
  {"id", "type": "metric", "metric": "<metrics.py function name>", "pred", "gt", "all_classes"}
  {"id", "type": "subset", "dataset", "e": bool, "predictions", "answers", "lengths", "all_classes"}
  {"id", "type": "jieba", "text"}
Output: one JSON line per case: {"id", "value": repr(float)} | {"id", "result": repr or {bucket: repr}}
| {"id", "tokens": [...]} | {"id", "error": "<ExceptionType>"}.

--fuzz difflib (default: LongBench's requirements do not install python-Levenshtein, so fuzzywuzzy
falls back to difflib) or --fuzz levenshtein (python-Levenshtein present).

Recursion: rouge 1.0.1's LCS walk is recursive, so whether it raises depends on the stack depth
at which eval.py calls it. eval.py calls `scorer` from module level (frame depth 2) and the
metric from `scorer` (depth 3). Every call below shifts sys.setrecursionlimit by the difference
between the current depth and eval.py's, so the cut-off is the one eval.py hits.
"""
import argparse
import json
import sys
import warnings

parser = argparse.ArgumentParser()
parser.add_argument("--fuzz", choices=["difflib", "levenshtein"], default="difflib")
ARGS = parser.parse_args()
if ARGS.fuzz == "difflib":
    sys.modules["Levenshtein"] = None  # makes `import Levenshtein` raise ImportError
warnings.filterwarnings("ignore")

import re
import string
from collections import Counter

import jieba
import numpy as np
from fuzzywuzzy import fuzz
from rouge import Rouge

jieba.setLogLevel(60)
_backend = fuzz.SequenceMatcher.__module__
assert (_backend == "difflib") == (ARGS.fuzz == "difflib"), f"fuzzywuzzy uses {_backend}"

# ---------------------------------------------------------------- metrics.py (verbatim)
def normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def normalize_zh_answer(s):
    """Lower text and remove punctuation, extra whitespace."""

    def white_space_fix(text):
        return "".join(text.split())

    def remove_punc(text):
        cn_punctuation = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
        all_punctuation = set(string.punctuation + cn_punctuation)
        return "".join(ch for ch in text if ch not in all_punctuation)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_punc(lower(s)))

def count_score(prediction, ground_truth, **kwargs):
    numbers = re.findall(r"\d+", prediction)
    right_num = 0
    for number in numbers:
        if str(number) == str(ground_truth):
            right_num += 1
    final_score = 0.0 if len(numbers) == 0 else right_num / len(numbers)
    return float(final_score)

def retrieval_score(prediction, ground_truth, **kwargs):
    pattern = r'Paragraph (\d+)'
    matches = re.findall(pattern, ground_truth)
    ground_truth_id = matches[0]
    numbers = re.findall(r"\d+", prediction)
    right_num = 0
    for number in numbers:
        if str(number) == str(ground_truth_id):
            right_num += 1
    final_score = 0.0 if len(numbers) == 0 else right_num / len(numbers)
    return float(final_score)

def retrieval_zh_score(prediction, ground_truth, **kwargs):
    pattern = r'段落(\d+)'
    matches = re.findall(pattern, ground_truth)
    ground_truth_id = matches[0]
    numbers = re.findall(r"\d+", prediction)
    right_num = 0
    for number in numbers:
        if str(number) == str(ground_truth_id):
            right_num += 1
    final_score = 0.0 if len(numbers) == 0 else right_num / len(numbers)
    return float(final_score)

def code_sim_score(prediction, ground_truth, **kwargs):
    all_lines = prediction.lstrip('\n').split('\n')
    prediction = ""
    for line in all_lines:
        if ('`' not in line) and ('#' not in line) and ('//' not in line):
            prediction = line
            break
    return (fuzz.ratio(prediction, ground_truth) / 100)

def classification_score(prediction, ground_truth, **kwargs):
    em_match_list = []
    all_classes = kwargs["all_classes"]
    for class_name in all_classes:
        if class_name in prediction:
            em_match_list.append(class_name)
    for match_term in em_match_list:
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    if ground_truth in em_match_list:
        score = (1.0 / len(em_match_list))
    else:
        score = 0.0
    return score

def rouge_score(prediction, ground_truth, **kwargs):
    rouge = Rouge()
    try:
        scores = rouge.get_scores([prediction], [ground_truth], avg=True)
    except:
        return 0.0
    return scores["rouge-l"]["f"]

def rouge_zh_score(prediction, ground_truth, **kwargs):
    prediction = " ".join(list(jieba.cut(prediction, cut_all=False)))
    ground_truth = " ".join(list(jieba.cut(ground_truth, cut_all=False)))
    score = rouge_score(prediction, ground_truth)
    return score

def f1_score(prediction, ground_truth, **kwargs):
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction)
    recall = 1.0 * num_same / len(ground_truth)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1

def qa_f1_score(prediction, ground_truth, **kwargs):
    normalized_prediction = normalize_answer(prediction)
    normalized_ground_truth = normalize_answer(ground_truth)

    prediction_tokens = normalized_prediction.split()
    ground_truth_tokens = normalized_ground_truth.split()
    return f1_score(prediction_tokens, ground_truth_tokens)


def qa_f1_zh_score(prediction, ground_truth, **kwargs):
    prediction_tokens = list(jieba.cut(prediction, cut_all=False))
    ground_truth_tokens = list(jieba.cut(ground_truth, cut_all=False))
    prediction_tokens = [normalize_zh_answer(token) for token in prediction_tokens]
    ground_truth_tokens = [normalize_zh_answer(token) for token in ground_truth_tokens]
    prediction_tokens = [token for token in prediction_tokens if len(token) > 0]
    ground_truth_tokens = [token for token in ground_truth_tokens if len(token) > 0]
    return f1_score(prediction_tokens, ground_truth_tokens)

# ---------------------------------------------------------------- eval.py (verbatim)
dataset2metric = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

def scorer_e(dataset, predictions, answers, lengths, all_classes):
    scores = {"0-4k": [], "4-8k": [], "8k+": []}
    for (prediction, ground_truths, length) in zip(predictions, answers, lengths):
        score = 0.
        if dataset in ["trec", "triviaqa", "samsum", "lsht"]:
            prediction = prediction.lstrip('\n').split('\n')[0]
        for ground_truth in ground_truths:
            score = max(score, dataset2metric[dataset](prediction, ground_truth, all_classes=all_classes))
        if length < 4000:
            scores["0-4k"].append(score)
        elif length < 8000:
            scores["4-8k"].append(score)
        else:
            scores["8k+"].append(score)
    for key in scores.keys():
        scores[key] = round(100 * np.mean(scores[key]), 2)
    return scores

def scorer(dataset, predictions, answers, all_classes):
    total_score = 0.
    for (prediction, ground_truths) in zip(predictions, answers):
        score = 0.
        if dataset in ["trec", "triviaqa", "samsum", "lsht"]:
            prediction = prediction.lstrip('\n').split('\n')[0]
        for ground_truth in ground_truths:
            score = max(score, dataset2metric[dataset](prediction, ground_truth, all_classes=all_classes))
        total_score += score
    return round(100 * total_score / len(predictions), 2)

# ---------------------------------------------------------------- driver (not LongBench's)
METRICS = {f.__name__: f for f in [qa_f1_score, qa_f1_zh_score, rouge_score, rouge_zh_score,
                                   classification_score, retrieval_score, retrieval_zh_score,
                                   count_score, code_sim_score]}
BASE_LIMIT = sys.getrecursionlimit()


def _depth():
    f, d = sys._getframe(1), 0
    while f is not None:
        d, f = d + 1, f.f_back
    return d


def at_eval_depth(eval_depth, fn, *args, **kwargs):
    """Call fn(*args) with the recursion limit shifted so fn's frame counts as depth eval_depth."""
    here = _depth()  # frames including this one; fn's frame will be here + 1
    sys.setrecursionlimit(BASE_LIMIT + (here + 1 - eval_depth))
    try:
        return fn(*args, **kwargs)
    finally:
        sys.setrecursionlimit(BASE_LIMIT)


def run(case):
    t = case["type"]
    if t == "metric":
        v = at_eval_depth(3, METRICS[case["metric"]], case["pred"], case["gt"],
                          all_classes=case.get("all_classes"))
        return {"value": repr(float(v))}
    if t == "subset":
        if case["e"]:
            r = at_eval_depth(2, scorer_e, case["dataset"], case["predictions"], case["answers"],
                              case["lengths"], case.get("all_classes"))
            return {"result": {k: repr(float(v)) for k, v in r.items()}}
        r = at_eval_depth(2, scorer, case["dataset"], case["predictions"], case["answers"],
                          case.get("all_classes"))
        return {"result": repr(float(r))}
    if t == "jieba":
        return {"tokens": list(jieba.cut(case["text"], cut_all=False))}
    raise ValueError(f"unknown case type {t}")


def main():
    out = sys.stdout
    for line in sys.stdin:
        case = json.loads(line)
        try:
            res = run(case)
        except Exception as e:  # the official code raising is a result too
            res = {"error": type(e).__name__}
        res["id"] = case["id"]
        out.write(json.dumps(res, ensure_ascii=False) + "\n")


main()
