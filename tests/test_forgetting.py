"""The forgetting comparison's plan and verdicts (benchmarks/forgetting.py, issue 24.3), without running it: its runs
are the methods comparison's, whose end-to-end test covers the execution."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import compare_methods as cm
from benchmarks import forgetting as fg


def test_every_method_and_ratio_runs_every_seed_with_mixing_and_retention(tmp_path):
    rates = {"ptuning_v2": 0.1, "prefix_tuning": 0.003, "lora": 0.01, "full": 0.001}
    runs = fg.forgetting_runs(fg.FULL, rates)
    assert len(runs) == len({r.id for r in runs}) == 4 * 3 * 3 == fg.planned_count(fg.FULL, False, {})
    paths = cm.Paths(Path("m"), tmp_path / "data", tmp_path / "work", tmp_path / "results")
    mixed = next(r for r in runs if r.method == "lora" and r.mix_ratio == 0.2 and r.seed == 1)
    assert mixed.id == "ner_gen-lora-lr0.01-s1-mix0.2-retention"
    command = " ".join(cm.train_command(mixed, fg.FULL.base, paths))
    assert f"--mix_file {tmp_path / 'data/general/chats.json'} --mix_ratio 0.2 --retention true" in command
    assert f"--retention_listing_file {tmp_path / 'data/pretrain/dev_tagged.json'}" in command
    plain = cm.Run("ner_gen", "lora", 0.01, 1, 64, 150)  # the methods comparison's runs are unchanged
    assert plain.id == "ner_gen-lora-lr0.01-s1" and "--mix_ratio" not in cm.train_command(
        plain, cm.FULL, paths
    )


def test_rates_come_from_the_methods_report_of_the_same_budget(tmp_path):
    report = tmp_path / "methods.json"
    rates = {f"ner_gen/{m}": lr for m, lr in (("ptuning_v2", 0.1), ("prefix_tuning", 3e-3), ("lora", 1e-2))}
    report.write_text(json.dumps({"budget": {**vars(cm.FULL)}, "rates": {**rates, "ner_gen/full": 1e-3}}))
    assert fg.committed_rates(fg.FULL, report) == {
        "ptuning_v2": 0.1,
        "prefix_tuning": 3e-3,
        "lora": 1e-2,
        "full": 1e-3,
    }
    report.write_text(json.dumps({"budget": {**vars(cm.FULL), "steps": 300}, "rates": rates}))
    assert fg.committed_rates(fg.FULL, report) is None  # another budget: chosen here on dev instead
    grid = fg.grid_runs(fg.TINY, {})
    assert {(r.task, r.method) for r in grid} == {("ner_gen", "ptuning_v2"), ("ner_gen", "lora")}
    assert all(
        not r.retention and not r.mix_ratio for r in grid
    )  # the dev choice is the plain methods grid's


def summary(values: dict[str, tuple[float, float]]) -> dict:
    return {"retention": values, "test": (30.0, 1.0), "done": 3}


def test_the_claims_read_retention_in_its_direction():
    good = {
        "heldout-perplexity": (50.0, 1.0),
        "copy-exact": (40.0, 1.0),
        "copy-share": (70.0, 1.0),
        "listing-f1": (28.0, 1.0),
    }
    bad = {
        "heldout-perplexity": (80.0, 1.0),
        "copy-exact": (5.0, 1.0),
        "copy-share": (40.0, 1.0),
        "listing-f1": (18.0, 1.0),
    }
    table = {
        "ptuning_v2": {"0": summary(bad), "0.2": summary(good)},
        "lora": {"0": summary(good), "0.2": summary(good)},
    }
    # a lower perplexity is better: LoRA keeps more on every metric
    assert fg.claim_lora_forgets_less(table)["verdict"] == "pass"
    assert (
        fg.claim_mixing_helps(table)["verdict"] == "partly"
    )  # helps P-Tuning v2, LoRA had nothing to regain
    table["lora"]["0"] = summary(bad)
    assert fg.claim_lora_forgets_less(table)["verdict"] == "not shown"
    assert fg.claim_mixing_helps(table)["verdict"] == "pass"
    table["ptuning_v2"]["0"] = summary(good)
    assert fg.claim_lora_forgets_less(table)["verdict"] == "fail"
