"""scripts/compare_methods.sh end to end on its tiny setting (a tiny backbone and tiny copies of the bundled data,
made here), its restart (finished runs are skipped), and the pieces that decide what it reports: the learning-rate
choice on dev, the tolerance of 'same', and the claims' verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_nlu import ner_nlu_rows, sentiment_rows
from test_train import ner_rows, write_jsonl
from tiny_models import save_tiny_backbone

from benchmarks import compare_methods as cm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def write_tiny_data(data: Path) -> list[str]:
    """The bundled layout (ner/, sentiment/, seg/, nlu/), a few rows each; the texts, for the tokenizer."""
    generative = {
        "ner": ner_rows(12),
        "sentiment": [
            {"content": f"判断情感：{r['text']}", "summary": "正面" if r["label"] else "负面"}
            for r in sentiment_rows(12)
        ],
        "seg": [{"content": f"分词：{r['content'][5:]}", "summary": "张三 在"} for r in ner_rows(12, seed=3)],
    }
    for task, rows in generative.items():
        for split in ("train", "dev", "test"):
            write_jsonl(
                (data / task).mkdir(parents=True, exist_ok=True) or data / task / f"{split}.json", rows
            )
    (data / "nlu").mkdir()
    for split in ("train", "dev", "test"):
        write_jsonl(data / "nlu" / f"sentiment_{split}.json", sentiment_rows(12))
        write_jsonl(data / "nlu" / f"ner_{split}.json", ner_nlu_rows(12))
    return [r["content"] + r["summary"] for rows in generative.values() for r in rows]


@pytest.fixture(scope="module")
def tiny_setting(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    texts = write_tiny_data(root / "data")
    save_tiny_backbone(root / "model", texts, initializer_range=0.2)
    return {
        "model": root / "model",
        "data": root / "data",
        "workdir": root / "work",
        "results": root / "results",
    }


def compare_script(setting: dict[str, Path]) -> subprocess.CompletedProcess:
    flags = [f"--{name} {path}" for name, path in setting.items()]
    command = ["bash", "scripts/compare_methods.sh", "--tiny", *" ".join(flags).split()]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_compare_methods_runs_end_to_end_and_resumes(tiny_setting):
    compare_script(tiny_setting)
    results = tiny_setting["results"]
    report = json.loads((results / "methods.json").read_text())
    assert report["runs_done"] == report["runs_planned"] == cm.planned_count(cm.TINY)
    assert not [r for r in report["runs"].values() if "failed" in r]
    markdown = (results / "methods.md").read_text()
    assert "PARTIAL" not in markdown and "bash scripts/compare_methods.sh --tiny" in markdown
    assert "Model name" not in markdown and "Machine:" in markdown
    for heading in (
        "## The paper's claims",
        "## Learning-rate grid",
        "## Multi-task prompt",
        "## Prompt length",
    ):
        assert heading in markdown
    assert (results / "methods.png").stat().st_size > 10_000
    for task in cm.TASKS.values():  # every method of every task: parameters, memory, scores on dev and test
        for summary in report["tables"]["main"][task.name].values():
            assert summary["done"] == 2 and summary["trainable"] > 0 and summary["peak_rss_mb"][0] > 100
            assert summary[f"dev/{task.score}"] is not None and summary[f"test/{task.score}"] is not None
    # A restart runs nothing again: every run has its result.json.
    started = time.monotonic()
    again = compare_script(tiny_setting)
    assert time.monotonic() - started < 60
    assert f"{report['runs_planned']}/{report['runs_planned']} runs" in again.stdout


def test_learning_rate_is_chosen_on_dev_at_seed_0():
    budget = cm.Budget(methods=("lora",), grid={"lora": (1e-4, 1e-3, 1e-2)}, seeds=(0, 1))
    results = {}
    for lr, dev, test in ((1e-4, 50.0, 99.0), (1e-3, 70.0, 10.0), (1e-2, None, None)):
        run = cm.Run("sentiment_cls", "lora", lr, 0, budget.pre_seq_len, budget.steps)
        results[run.id] = {"failed": "error: diverged"} if dev is None else {"dev": {"accuracy": dev}}
        results[run.id]["test"] = {"accuracy": test}
    rates = cm.chosen_rates(budget, results)
    assert (
        rates["sentiment_cls", "lora"] == 1e-3
    )  # the best dev, although another rate has the best test score


def test_the_full_plan_counts_every_distinct_run_once():
    """The progress bar's total: seed 0 at the chosen rate is a grid run, length 64 of the sweep a main run; a
    rate beyond a grid's edge counts once the grid says it is needed."""
    budget = cm.FULL
    assert cm.planned_count(budget) == 116
    results = {r.id: {"dev": {cm.TASKS[r.task].score: r.learning_rate}} for r in cm.grid_runs(budget)}
    for run in cm.edge_runs(budget, results):  # the best dev is at the top of every grid: one step up each
        results[run.id] = {"dev": {cm.TASKS[run.task].score: 0.0}}
    planned = {run.id for runs in cm.phases(budget, results) for run in runs}
    assert len(planned) == cm.planned_count(budget, results) == 116 + 18
    rates = cm.chosen_rates(budget, results)
    assert rates["ner_tok", "full"] == 3e-4  # the step beyond (1e-3) scored worse on dev
    assert cm.searched_rates(budget, results)["ner_tok", "full"] == (3e-5, 1e-4, 3e-4, 1e-3)
    targets = cm.target_runs(budget, rates)
    assert {r.steps for r in targets} == {budget.steps} and len(targets) == 2 * len(budget.seeds)


def test_a_grid_whose_best_is_at_its_edge_is_searched_one_step_further():
    budget = cm.Budget(methods=("lora", "ptuning_v2"), seeds=(0, 1))
    assert cm.edge_runs(budget, {}) == []  # nothing is known before the grid has run
    scores = {
        "lora": {3e-4: 50.0, 1e-3: 40.0, 3e-3: 30.0},
        "ptuning_v2": {1e-2: 10.0, 3e-2: 60.0, 1e-1: 20.0},
    }
    results = {}
    for task in cm.TASKS:
        for method, by_rate in scores.items():
            for lr, dev in by_rate.items():
                run = cm.Run(task, method, lr, 0, budget.pre_seq_len, budget.steps)
                results[run.id] = {"dev": {cm.TASKS[task].score: dev}}
    beyond = cm.edge_runs(budget, results)
    assert {(r.method, r.learning_rate) for r in beyond} == {("lora", 1e-4)}  # ptuning_v2's best is inside
    assert len(beyond) == len(cm.TASKS)
    for run in beyond:
        results[run.id] = {"dev": {cm.TASKS[run.task].score: 55.0}}
    assert cm.chosen_rates(budget, results)["ner_gen", "lora"] == 1e-4
    assert cm.edge_runs(budget, results) == beyond  # one step only, although 1e-4 is again at the edge
    assert [cm.next_rate(r, up) for r, up in ((1e-1, True), (3e-2, True), (1e-2, False), (3e-5, False))] == [
        0.3,
        0.1,
        0.003,
        1e-05,
    ]


def test_same_means_within_the_sum_of_the_stds():
    assert cm.compare((50.0, 1.0), (48.5, 1.0)) == "same"
    assert cm.compare((50.0, 1.0), (47.9, 1.0)) == "higher"
    assert cm.compare((50.0, 0.0), (50.6, 0.0)) == "lower"  # at least 0.5 points
    assert cm.compare(None, (1.0, 0.0)) is None


def test_claims_read_their_tables():
    def summary(test: float, std: float = 0.5) -> dict:
        return {f"test/{t.score}": (test, std, 3) for t in cm.TASKS.values()}

    main = {
        "ner_gen": {"ptuning_v2": summary(30), "prefix_tuning": summary(35), "full": summary(31)},
        "sentiment_cls": {"ptuning_v2": summary(80), "prefix_tuning": summary(80), "full": summary(90)},
        "ner_tok": {
            "ptuning_v2": summary(40),
            "prefix_tuning": summary(39.5),
            "full": summary(40.5),
            "ptuning_v1": summary(10),
            "prompt_tuning": summary(39),
        },
    }
    dev = lambda v: {"dev/accuracy": (v, 0.1, 3), "dev/span-f1": (v, 0.1, 3)}  # noqa: E731
    sweep = {"sentiment_cls": {4: dev(80), 64: dev(70)}, "ner_tok": {4: dev(20), 64: dev(40)}}
    tables = {"main": main, "sweep": sweep, "mpt": {"scratch": summary(30), "mix_all": summary(33)}}
    claims = cm.judge(tables)
    assert claims["deep_vs_full"]["verdict"] == "partly"  # sentiment: 80 vs 90
    assert claims["shallow_fail"]["verdict"] == "partly"  # prompt tuning is as good here
    assert claims["mlp"]["verdict"] == "pass"  # helps on ner_gen only
    assert claims["length"]["verdict"] == "pass" and claims["length"]["best"] == {
        "sentiment_cls": 4,
        "ner_tok": 64,
    }
    assert claims["mpt"]["verdict"] == "pass"
    # Differences within the seeds' spread are 'not shown', not 'fail'; numbers against a claim are 'fail'.
    wide = lambda v: {"dev/accuracy": (v, 2.0, 3), "dev/span-f1": (v, 2.0, 3)}  # noqa: E731
    tables["sweep"] = {"sentiment_cls": {4: wide(70), 64: wide(72)}, "ner_tok": {4: wide(41), 64: wide(40)}}
    tables["mpt"]["mix_all"] = summary(30.4)
    tables["main"]["ner_tok"]["prompt_tuning"] = summary(39.8)
    claims = cm.judge(tables)
    assert claims["length"]["verdict"] == "not shown" and claims["length"]["best"]["ner_tok"] == 4
    assert claims["mpt"]["verdict"] == "not shown"
    assert claims["shallow_fail"]["verdict"] == "partly"  # v1 clearly below, prompt tuning within the spread
    tables["main"]["ner_tok"]["prompt_tuning"] = summary(45)
    tables["main"]["ner_tok"]["ptuning_v1"] = summary(40)
    assert cm.judge(tables)["shallow_fail"]["verdict"] == "fail"  # one above, one level: against the claim
    tables["main"]["ner_gen"]["prefix_tuning"] = summary(30)
    tables["main"]["ner_tok"]["prefix_tuning"] = summary(40)
    assert cm.judge(tables)["mlp"]["verdict"] == "not shown"  # level on every task
    tables["main"]["sentiment_cls"]["prefix_tuning"] = summary(70)
    assert cm.judge(tables)["mlp"]["verdict"] == "fail"  # never helps, hurts once
