"""Do the P-Tuning v2 paper's claims hold here? Every method on every task, multi-task prompt pre-training, and
prompt length, on the embedded backbone (issue 14).

    bash scripts/compare_methods.sh                # the whole comparison -> benchmarks/results/methods.{md,png,json}
    python -m benchmarks.compare_methods --tiny --model DIR --data DIR --results DIR --workdir DIR   # the test

What runs, in four phases (each phase's runs two at a time, ``--jobs``):

1. the learning-rate grid: every method x task at seed 0 and each learning rate of the method's grid;
2. where a grid's best dev score sits at its edge, one more rate a step beyond that edge; the rate with the best
   dev score of those tried is the method's rate for that task (never the test score);
3. the other seeds at the chosen rates; the two multi-task pre-trainings (a P-Tuning v2 prefix on the mix of the
   bundled generative tasks, with and without the target task); the prompt-length sweep;
4. the target runs warm-started from those pre-trained prefixes.

Every training is a subprocess ``python -m ptuning_v2.train ...`` with one torch thread (two threads on a shared
2-core machine spend most of their time waiting for each other), so its peak memory is its own (``os.wait4``'s
``ru_maxrss``). A run leaves ``<workdir>/runs/<run>/result.json``; a restarted script skips every run that has one,
and the report is rewritten after each phase, marked partial until every run is done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.report import cpu_kind
from ptuning_v2 import mixing, retention
from ptuning_v2.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REPORT = "methods"

# ------------------------------------------------------------------------------------------------ what is compared


@dataclass(frozen=True)
class Task:
    name: str
    task_type: str  # generation, seq_cls, token_cls (ptuning_v2.train --task_type)
    files: str  # train/dev/test under the data directory: "ner/{split}.json"
    score: str  # the metric the grid maximises and the tables lead with
    extra: tuple[str, ...]  # further metrics shown beside it
    title: str
    max_source_length: int


TASKS = {
    "ner_gen": Task(
        "ner_gen", "generation", "ner/{split}.json", "entity-f1", ("rouge-l",), "NER, generative answer", 96
    ),
    "sentiment_cls": Task(
        "sentiment_cls",
        "seq_cls",
        "nlu/sentiment_{split}.json",
        "accuracy",
        (),
        "sentiment, sequence-classification head",
        128,
    ),
    "ner_tok": Task(
        "ner_tok",
        "token_cls",
        "nlu/ner_{split}.json",
        "span-f1",
        (),
        "NER, token-classification head (BIO)",
        128,
    ),
}
METHOD_ORDER = ("ptuning_v2", "prefix_tuning", "ptuning_v1", "prompt_tuning", "lora", "full")
PROMPT_METHODS = ("ptuning_v2", "prefix_tuning", "ptuning_v1", "prompt_tuning")
SHALLOW = ("ptuning_v1", "prompt_tuning")
# Each method's grid: its starting point (ptuning_v2.train's DEFAULT_LEARNING_RATES) with a step of ~3 each way.
GRID = {
    "ptuning_v2": (1e-2, 3e-2, 1e-1),
    "prefix_tuning": (3e-3, 1e-2, 3e-2),
    "ptuning_v1": (3e-3, 1e-2, 3e-2),
    "prompt_tuning": (3e-2, 1e-1, 3e-1),
    "lora": (3e-4, 1e-3, 3e-3),
    "full": (3e-5, 1e-4, 3e-4),
}
# The multi-task mixes: the bundled generative tasks, with the target (NER) and without it.
MIXES = {
    "mix_all": ("ner/train.json", "sentiment/train.json", "seg/train.json"),
    "mix_others": ("sentiment/train.json", "seg/train.json"),
}
MPT_TARGET = "ner_gen"


@dataclass(frozen=True)
class Budget:
    """How much each run gets: the same for every method."""

    steps: int = 150
    batch: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    pre_seq_len: int = 64
    lengths: tuple[int, ...] = (4, 16, 64, 128)
    mpt_steps: int = 300
    methods: tuple[str, ...] = METHOD_ORDER
    grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(GRID))
    mixes: tuple[str, ...] = ("mix_all", "mix_others")
    # Evaluation caps (the first N of each file: the bundled files are already in a salted-hash order).
    dev_generation: int = 100
    test_generation: int = 200
    dev_nlu: int = 300
    test_nlu: int = 500
    max_new_tokens: int = 48

    def describe(self) -> str:
        return (
            f"{self.steps} steps of batch {self.batch} for every method and task (each training example seen once: "
            f"the first {self.steps * self.batch} of the training file), linear decay, no warmup; "
            f"seeds {', '.join(map(str, self.seeds))}; prompt length {self.pre_seq_len}; learning rate chosen per "
            f"method and task on dev at seed 0 from its grid (one step further where the grid's best sits at its "
            f"edge); generative tasks scored on the first "
            f"{self.dev_generation} dev / {self.test_generation} test examples (greedy, at most "
            f"{self.max_new_tokens} new tokens), NLU heads on the first {self.dev_nlu} dev / {self.test_nlu} test; "
            f"multi-task pre-training {self.mpt_steps} steps on the mix, then {self.steps} target steps"
        )


FULL = Budget()
TINY = Budget(
    steps=4,
    batch=4,
    seeds=(0, 1),
    pre_seq_len=4,
    lengths=(2, 4),
    mpt_steps=4,
    methods=("ptuning_v2",),
    grid={"ptuning_v2": (1e-1,)},
    mixes=("mix_all",),
    dev_generation=4,
    test_generation=4,
    dev_nlu=8,
    test_nlu=8,
    max_new_tokens=8,
)

# ------------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    learning_rate: float
    seed: int
    pre_seq_len: int
    steps: int
    mix: str | None = None  # a multi-task pre-training on this mix (task is then the mix's target)
    warm_start: str | None = None  # the id of the run whose prefix this one starts from
    # The forgetting comparison's (benchmarks/forgetting.py): general chats at this share of every batch, and the
    # retention score of ptuning_v2.retention beside the task's.
    mix_ratio: float = 0.0
    retention: bool = False

    @property
    def id(self) -> str:
        length = f"-p{self.pre_seq_len}" if self.method in PROMPT_METHODS else ""
        base = f"{self.method}{length}-lr{self.learning_rate:g}-s{self.seed}"
        if self.mix:
            return f"pretrain-{self.mix}-{base}-{self.steps}steps"
        general = (f"-mix{self.mix_ratio:g}" if self.mix_ratio else "") + (
            "-retention" if self.retention else ""
        )
        return f"{self.task}-{base}{general}" + (f"-from-{self.warm_start}" if self.warm_start else "")


@dataclass
class Paths:
    model: Path
    data: Path
    workdir: Path
    results: Path

    def run_dir(self, run: Run) -> Path:
        return self.workdir / "runs" / run.id


def bundled(paths: Paths, default: str) -> str:
    """A bundled file's default path (``data/...``, as the package names it) under the runs' data directory."""
    return str(paths.data / Path(default).relative_to("data"))


def _general_flags(run: Run, paths: Paths) -> list[str]:
    """The mix and the retention set of a forgetting run, from the runs' data directory."""
    flags = []
    if run.mix_ratio:
        flags += ["--mix_file", bundled(paths, mixing.BUNDLED_MIX), "--mix_ratio", f"{run.mix_ratio:g}"]
    if run.retention:
        flags += ["--retention", "true"]
        for flag, default, _ in retention.RetentionSettings().parts():
            flags += [f"--{flag}", bundled(paths, default)]
    return flags


def _data_flags(run: Run, budget: Budget, paths: Paths) -> list[str]:
    task = TASKS[run.task]
    split = lambda name: str(paths.data / task.files.format(split=name))  # noqa: E731
    if run.mix:
        train = ",".join(str(paths.data / f) for f in MIXES[run.mix])
        return ["--train_file", train, "--max_train_samples", str(run.steps * budget.batch)]
    generative = task.task_type == "generation"
    return [
        "--train_file", split("train"), "--validation_file", split("dev"), "--test_file", split("test"),
        "--do_eval", "true", "--do_predict", "true",
        "--max_train_samples", str(run.steps * budget.batch),
        "--max_eval_samples", str(budget.dev_generation if generative else budget.dev_nlu),
        "--max_predict_samples", str(budget.test_generation if generative else budget.test_nlu),
    ]  # fmt: skip


def train_command(run: Run, budget: Budget, paths: Paths) -> list[str]:
    """``python -m ptuning_v2.train`` with everything this run is told."""
    task = TASKS[run.task]
    command = [
        sys.executable, "-m", "ptuning_v2.train",
        "--model_name_or_path", str(paths.model), "--method", run.method, "--task_type", task.task_type,
        "--output_dir", str(paths.run_dir(run) / "train"), "--overwrite_output_dir", "true",
        "--do_train", "true", "--max_steps", str(run.steps), "--per_device_train_batch_size", str(budget.batch),
        "--learning_rate", f"{run.learning_rate:g}", "--seed", str(run.seed), "--pre_seq_len", str(run.pre_seq_len),
        "--max_source_length", str(task.max_source_length), "--max_target_length", "48",
        "--max_new_tokens", str(budget.max_new_tokens), "--per_device_eval_batch_size", "50",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "25", "--disable_tqdm", "true",
        *_data_flags(run, budget, paths), *_general_flags(run, paths),
    ]  # fmt: skip
    if run.warm_start:
        command += ["--ptuning_checkpoint", str(paths.workdir / "runs" / run.warm_start / "train")]
    return command


# ------------------------------------------------------------------------------------------------ executing one run


_TRAINABLE = re.compile(r"^\w+: trainable ([\d,]+) / total ([\d,]+)", re.MULTILINE)


def _outcome(run: Run, train_dir: Path, log: str) -> dict[str, Any]:
    """What a finished run measured: parameters, train time, dev and test metrics."""
    counted = _TRAINABLE.search(log)
    trainable, total = (int(g.replace(",", "")) for g in counted.groups()) if counted else (None, None)
    results = json.loads((train_dir / "all_results.json").read_text())
    strip = lambda metrics: {k: v for k, v in (metrics or {}).items() if k != "speed"}  # noqa: E731
    return {
        "trainable": trainable,
        "total": total,
        "train_seconds": results.get("train", {}).get("train_runtime"),
        "dev": strip((results.get("eval") or {}).get("after")),
        "test": strip(results.get("predict")),
        **({"retention": results["retention"]} if "retention" in results else {}),
    }


def _failure(log: str) -> str:
    """The run's own ``error:`` line (a diverged run stops with one), or the last line of its log."""
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    lines = errors or log.strip().splitlines() or ["(no output)"]
    return lines[-1][:500]


def execute(run: Run, budget: Budget, paths: Paths) -> dict[str, Any]:
    """Train and score one run in a fresh process; its result is written to ``result.json`` (also a failure,
    so that a restart does not repeat a run that diverged)."""
    directory = paths.run_dir(run)
    if (directory / "result.json").is_file():
        return json.loads((directory / "result.json").read_text())
    shutil.rmtree(directory, ignore_errors=True)  # a run killed half-way starts over
    directory.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.monotonic()
    with open(directory / "log.txt", "w") as log_file:
        process = subprocess.Popen(
            train_command(run, budget, paths), cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    log = (directory / "log.txt").read_text(errors="replace")
    result: dict[str, Any] = {
        "run": {**asdict(run), "id": run.id},
        "wall_seconds": round(time.monotonic() - started, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports kilobytes
        # CPU time, unlike wall time, hardly depends on what else the machine runs: the budget is planned on it.
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "exit_code": process.returncode,
    }
    if process.returncode == 0:
        result.update(_outcome(run, directory / "train", log))
    else:
        result["failed"] = _failure(log)
    atomic_write_text(directory / "result.json", json.dumps(result, indent=2) + "\n")  # a restart reads it
    return result


def execute_all(runs: list[Run], budget: Budget, paths: Paths, jobs: int, progress: Any) -> dict[str, dict]:
    """Every run (``jobs`` at a time), each result by run id; a run that is done already only ticks the bar."""
    results: dict[str, dict] = {}

    def one(run: Run) -> None:
        results[run.id] = execute(run, budget, paths)
        result = results[run.id]
        shown = "failed" if "failed" in result else result.get("dev", {}).get(TASKS[run.task].score, "done")
        progress.set_postfix_str(f"{run.id}: {shown}", refresh=False)
        progress.update(1)

    unique = list({run.id: run for run in runs}.values())
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, unique))
    return results


# ------------------------------------------------------------------------------------------------ the plan


def dev_score(result: dict | None, task: str) -> float:
    """A run's dev score for choosing; a failed (diverged) run ranks last."""
    value = (result or {}).get("dev", {}).get(TASKS[task].score)
    return -math.inf if value is None else value


def rate_run(budget: Budget, task: str, method: str, learning_rate: float) -> Run:
    """The run that tries a learning rate: seed 0 at the main prompt length."""
    return Run(task, method, learning_rate, budget.seeds[0], budget.pre_seq_len, budget.steps)


def grid_runs(budget: Budget) -> list[Run]:
    return [
        rate_run(budget, task, method, lr)
        for task in TASKS
        for method in budget.methods
        for lr in budget.grid[method]
    ]


def next_rate(rate: float, up: bool) -> float:
    """The neighbour of ``rate`` in the 1-3-10 sequence the grids are written in (1e-2, 3e-2, 1e-1, ...)."""
    exponent = math.floor(math.log10(rate) + 1e-9)
    small = round(rate / 10**exponent) < 2  # a 1eK rate, else a 3eK one
    if up:
        return float(f"3e{exponent}") if small else float(f"1e{exponent + 1}")
    return float(f"3e{exponent - 1}") if small else float(f"1e{exponent}")


def _best_rate(
    budget: Budget, results: dict[str, dict], task: str, method: str, rates: Iterable[float]
) -> float:
    """The rate with the best dev score at seed 0 (ties: the smaller rate)."""
    runs = [rate_run(budget, task, method, lr) for lr in rates]
    return max(runs, key=lambda r: (dev_score(results.get(r.id), task), -r.learning_rate)).learning_rate


def searched_rates(budget: Budget, results: dict[str, dict]) -> dict[tuple[str, str], tuple[float, ...]]:
    """(task, method) -> the rates tried at seed 0: the method's grid, plus one step beyond its edge where the
    grid's best dev score sits at that edge (once: the budget stays bounded, and a rate still at the edge is
    flagged in the report)."""
    searched = {}
    for task in TASKS:
        for method in budget.methods:
            grid = tuple(sorted(budget.grid[method]))
            if len(grid) > 1 and all(rate_run(budget, task, method, lr).id in results for lr in grid):
                best = _best_rate(budget, results, task, method, grid)
                if best == grid[0]:
                    grid = (next_rate(best, up=False), *grid)
                elif best == grid[-1]:
                    grid = (*grid, next_rate(best, up=True))
            searched[task, method] = grid
    return searched


def edge_runs(budget: Budget, results: dict[str, dict]) -> list[Run]:
    """The runs one step beyond a grid's edge (``searched_rates``), once the grid's runs are done."""
    return [
        rate_run(budget, task, method, lr)
        for (task, method), rates in searched_rates(budget, results).items()
        for lr in rates
        if lr not in budget.grid[method]
    ]


def chosen_rates(budget: Budget, results: dict[str, dict]) -> dict[tuple[str, str], float]:
    """(task, method) -> the searched rate with the best dev score at seed 0 (ties: the smaller rate)."""
    return {
        (task, method): _best_rate(budget, results, task, method, rates)
        for (task, method), rates in searched_rates(budget, results).items()
    }


def seed_runs(budget: Budget, rates: dict[tuple[str, str], float]) -> list[Run]:
    return [
        Run(task, method, rates[task, method], seed, budget.pre_seq_len, budget.steps)
        for (task, method) in rates
        for seed in budget.seeds
    ]


def pretrain_runs(budget: Budget, rates: dict[tuple[str, str], float]) -> list[Run]:
    """One P-Tuning v2 prefix per mix, at the rate chosen for the target task (seed 0)."""
    rate = rates.get((MPT_TARGET, "ptuning_v2"))
    if rate is None:
        return []
    return [
        Run(MPT_TARGET, "ptuning_v2", rate, budget.seeds[0], budget.pre_seq_len, budget.mpt_steps, mix=mix)
        for mix in budget.mixes
    ]


def target_runs(budget: Budget, rates: dict[tuple[str, str], float]) -> list[Run]:
    """The target task from each pre-trained prefix, with the same steps, rate and seeds as from scratch."""
    return [
        Run(
            MPT_TARGET,
            "ptuning_v2",
            pre.learning_rate,
            seed,
            budget.pre_seq_len,
            budget.steps,
            warm_start=pre.id,
        )
        for pre in pretrain_runs(budget, rates)
        for seed in budget.seeds
    ]


SWEEP_TASKS = ("sentiment_cls", "ner_tok")


def sweep_runs(budget: Budget, rates: dict[tuple[str, str], float]) -> list[Run]:
    """P-Tuning v2 at every prompt length, at the rate chosen for the task at the main length."""
    return [
        Run(task, "ptuning_v2", rates[task, "ptuning_v2"], seed, length, budget.steps)
        for task in SWEEP_TASKS
        if (task, "ptuning_v2") in rates
        for length in budget.lengths
        for seed in budget.seeds
    ]


def planned_count(budget: Budget, results: dict[str, dict] | None = None) -> int:
    """How many distinct runs the whole comparison makes (for the progress bar); the runs beyond a grid's edge
    count once the grid's results say which are needed."""
    per_cell = len(budget.seeds) - 1
    main = sum(len(budget.grid[m]) + per_cell for m in budget.methods) * len(TASKS)
    mpt = len(budget.mixes) * (1 + len(budget.seeds)) if "ptuning_v2" in budget.methods else 0
    other_lengths = [n for n in budget.lengths if n != budget.pre_seq_len]
    sweep = len(SWEEP_TASKS) * len(other_lengths) * len(budget.seeds) if "ptuning_v2" in budget.methods else 0
    return main + mpt + sweep + len(edge_runs(budget, results or {}))


# ------------------------------------------------------------------------------------------------ summaries


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _metric(results: Iterable[dict], split: str, key: str) -> tuple[float, float, int] | None:
    values = [r[split][key] for r in results if key in r.get(split, {})]
    summary = mean_std(values)
    return (*summary, len(values)) if summary else None


def summarise(runs: list[Run], results: dict[str, dict]) -> dict[str, Any]:
    """Mean ± std over the seeds of a group of runs (one method on one task), plus its cost."""
    done = [results[r.id] for r in runs if r.id in results and "failed" not in results[r.id]]
    failed = [results[r.id]["failed"] for r in runs if r.id in results and "failed" in results[r.id]]
    task = TASKS[runs[0].task]
    keys = (task.score, *task.extra)
    first = done[0] if done else {}
    return {
        "runs": len(runs),
        "done": len(done),
        "failed": failed,
        "learning_rate": runs[0].learning_rate,
        "trainable": first.get("trainable"),
        "total": first.get("total"),
        "train_seconds": mean_std([r["train_seconds"] for r in done if r.get("train_seconds") is not None]),
        "cpu_seconds": mean_std([r["cpu_seconds"] for r in done if r.get("cpu_seconds") is not None]),
        "peak_rss_mb": mean_std([r["peak_rss_mb"] for r in done]),
        **{f"{split}/{key}": _metric(done, split, key) for split in ("dev", "test") for key in keys},
    }


def summaries(budget: Budget, results: dict[str, dict]) -> dict[str, Any]:
    """Every table's numbers: the main comparison, the grid, multi-task pre-training and the length sweep."""
    rates = chosen_rates(budget, results)
    main = {
        task: {
            method: summarise(
                [r for r in seed_runs(budget, rates) if r.task == task and r.method == method], results
            )
            for method in budget.methods
        }
        for task in TASKS
    }
    grid = {
        f"{r.task}/{r.method}/{r.learning_rate:g}": dev_score(results.get(r.id), r.task)
        for r in grid_runs(budget) + edge_runs(budget, results)
    }
    mpt = {"scratch": main[MPT_TARGET].get("ptuning_v2")} if "ptuning_v2" in budget.methods else {}
    for pre in pretrain_runs(budget, rates):
        mpt[pre.mix] = summarise([r for r in target_runs(budget, rates) if r.warm_start == pre.id], results)
    sweep = {
        task: {
            length: summarise(
                [r for r in sweep_runs(budget, rates) if r.task == task and r.pre_seq_len == length], results
            )
            for length in budget.lengths
        }
        for task in SWEEP_TASKS
        if (task, "ptuning_v2") in rates
    }
    return {"main": main, "grid": grid, "mpt": mpt, "sweep": sweep}


# ------------------------------------------------------------------------------------------------ the paper's claims


def _value(summary: dict | None, key: str) -> tuple[float, float] | None:
    entry = (summary or {}).get(key)
    return (entry[0], entry[1]) if entry else None


def compare(a: tuple[float, float] | None, b: tuple[float, float] | None) -> str | None:
    """``a`` against ``b``: 'higher', 'lower' or 'same' (within the sum of their stds over seeds, at least 0.5)."""
    if a is None or b is None:
        return None
    tolerance = max(0.5, a[1] + b[1])
    if a[0] - b[0] > tolerance:
        return "higher"
    return "lower" if b[0] - a[0] > tolerance else "same"


def _shown(value: tuple[float, float] | None) -> str:
    return "not measured" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def claim_deep_vs_full(tables: dict[str, Any]) -> dict[str, Any]:
    """Deep prompts (P-Tuning v2) match fine-tuning on every task: not lower than full beyond the tolerance."""
    rows, verdicts = [], []
    for task, methods in tables["main"].items():
        key = f"test/{TASKS[task].score}"
        deep, full = _value(methods.get("ptuning_v2"), key), _value(methods.get("full"), key)
        verdict = compare(deep, full)
        verdicts.append(verdict and ("pass" if verdict in ("same", "higher") else "fail"))
        rows.append(f"{task}: ptuning_v2 {_shown(deep)} vs full {_shown(full)} ({verdict or 'n/a'})")
    return combined_verdict(verdicts, rows)


def claim_shallow_fail_on_labelling(tables: dict[str, Any]) -> dict[str, Any]:
    """On sequence labelling (token classification) the shallow prompts fall clearly below P-Tuning v2."""
    methods = tables["main"].get("ner_tok", {})
    key = "test/span-f1"
    deep = _value(methods.get("ptuning_v2"), key)
    rows, verdicts = [], []
    for shallow in SHALLOW:
        value = _value(methods.get(shallow), key)
        verdict = compare(value, deep)
        verdicts.append(verdict and {"lower": "pass", "same": "not shown", "higher": "fail"}[verdict])
        rows.append(f"ner_tok: {shallow} {_shown(value)} vs ptuning_v2 {_shown(deep)} ({verdict or 'n/a'})")
    return combined_verdict(verdicts, rows)


def claim_mlp_depends_on_task(tables: dict[str, Any]) -> dict[str, Any]:
    """The reparameterisation MLP (prefix_tuning) helps on some tasks and not on others."""
    rows, effects = [], []
    for task, methods in tables["main"].items():
        key = f"test/{TASKS[task].score}"
        mlp, plain = _value(methods.get("prefix_tuning"), key), _value(methods.get("ptuning_v2"), key)
        verdict = compare(mlp, plain)
        effects.append(verdict)
        rows.append(f"{task}: with MLP {_shown(mlp)} vs without {_shown(plain)} ({verdict or 'n/a'})")
    measured = [e for e in effects if e]
    if len(measured) < 2:
        return {"verdict": "not measured", "rows": rows}
    if "higher" in measured:
        verdict = "pass" if any(e != "higher" for e in measured) else "fail"  # it helps everywhere
    else:
        verdict = "fail" if "lower" in measured else "not shown"  # never helps: hurts, or makes no difference
    return {"verdict": verdict, "rows": rows}


def claim_length_depends_on_task(tables: dict[str, Any]) -> dict[str, Any]:
    """The best prompt length (by dev) differs between tasks: shorter for classification than for labelling."""
    best, flat, rows = {}, {}, []
    for task, lengths in tables["sweep"].items():
        dev = {n: _value(s, f"dev/{TASKS[task].score}") for n, s in lengths.items()}
        measured = {n: v for n, v in dev.items() if v}
        if measured:
            best[task] = max(measured, key=lambda n: measured[n][0])
            # Length matters for a task only where some length is worse than the best beyond the seeds' spread.
            flat[task] = all(compare(v, measured[best[task]]) == "same" for v in measured.values())
        rows.append(f"{task}: dev by length " + ", ".join(f"{n}: {_shown(v)}" for n, v in dev.items()))
    if len(best) < 2:
        return {"verdict": "not measured", "rows": rows, "best": best}
    rows.append(
        "best length by dev mean: "
        + ", ".join(
            f"{t} {n}" + (" (every length within the spread)" if flat[t] else "") for t, n in best.items()
        )
    )
    if all(flat.values()):
        verdict = "not shown"
    else:
        verdict = "pass" if best["sentiment_cls"] < best["ner_tok"] else "fail"
    return {"verdict": verdict, "rows": rows, "best": best}


def claim_mpt_helps(tables: dict[str, Any]) -> dict[str, Any]:
    """A prefix pre-trained on the task mix, then trained on the target, beats one trained from scratch."""
    key = f"test/{TASKS[MPT_TARGET].score}"
    scratch = _value(tables["mpt"].get("scratch"), key)
    rows, verdicts = [], []
    for mix, summary in tables["mpt"].items():
        if mix == "scratch":
            continue
        value = _value(summary, key)
        verdict = compare(value, scratch)
        verdicts.append(verdict and {"higher": "pass", "same": "not shown", "lower": "fail"}[verdict])
        rows.append(
            f"{MPT_TARGET} from {mix}: {_shown(value)} vs from scratch {_shown(scratch)} ({verdict or 'n/a'})"
        )
    return combined_verdict(verdicts[:1], rows)  # the paper's mix holds the target task: mix_all decides


def combined_verdict(checks: list[str | None], rows: list[str]) -> dict[str, Any]:
    """One verdict from the checks ('pass', 'fail' where the numbers go against the claim, 'not shown' where the
    difference is within the seeds' spread, None where not measured)."""
    measured = [c for c in checks if c]
    if not measured:
        verdict = "not measured"
    elif all(c == "pass" for c in measured):
        verdict = "pass"
    elif "pass" in measured:
        verdict = "partly"
    else:
        verdict = "fail" if "fail" in measured else "not shown"
    return {"verdict": verdict, "rows": rows}


CLAIMS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "deep_vs_full": ("Deep prompts (P-Tuning v2) match full fine-tuning on every task", claim_deep_vs_full),
    "shallow_fail": (
        "On sequence labelling, shallow prompts (P-Tuning v1, Prompt Tuning) fall clearly below deep prompts",
        claim_shallow_fail_on_labelling,
    ),
    "mlp": ("The reparameterisation MLP helps on some tasks and not on others", claim_mlp_depends_on_task),
    "length": (
        "The best prompt length depends on the task (short for classification, long for labelling)",
        claim_length_depends_on_task,
    ),
    "mpt": ("Multi-task prompt pre-training helps the target task", claim_mpt_helps),
}


def judge(tables: dict[str, Any]) -> dict[str, Any]:
    return {name: {"claim": text, **check(tables)} for name, (text, check) in CLAIMS.items()}


# ------------------------------------------------------------------------------------------------ the report


def machine() -> str:
    """The CPU's model name and kind, its CPU count, and the load when the report was written."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{cpu_kind()}, {os.cpu_count()} CPUs (load average {load} when written)"


def _cell(entry: tuple[float, float, int] | None) -> str:
    return "–" if not entry else f"{entry[0]:.2f} ± {entry[1]:.2f}"


def _count(summary: dict) -> str:
    if summary.get("trainable") is None:
        return "–", "–"
    return f"{summary['trainable']:,}", f"{100 * summary['trainable'] / summary['total']:.2f}%"


def main_table(
    task: Task, methods: dict[str, dict], searched: dict[tuple[str, str], list[float]]
) -> list[str]:
    keys = (task.score, *task.extra)
    head = (
        "| method | trainable | % of model | lr (grid) | train s | run CPU s | peak RSS MB | "
        + " | ".join(f"{split} {key}" for key in keys for split in ("dev", "test"))
    )
    rows = [head + " | seeds |", "|---|---:|---:|---|---:|---:|---:|" + "---:|" * (2 * len(keys)) + "---:|"]
    for method, s in methods.items():
        grid = "/".join(f"{lr:g}" for lr in searched[task.name, method])
        seconds, cpu, memory = s["train_seconds"], s["cpu_seconds"], s["peak_rss_mb"]
        scores = " | ".join(_cell(s[f"{split}/{key}"]) for key in keys for split in ("dev", "test"))
        trainable, share = _count(s)
        rows.append(
            f"| {method} | {trainable} | {share} | {s['learning_rate']:g} ({grid}) | "
            f"{'–' if not seconds else f'{seconds[0]:.0f}'} | {'–' if not cpu else f'{cpu[0]:.0f}'} | "
            f"{'–' if not memory else f'{memory[0]:.0f}'} | "
            f"{scores} | {s['done']}/{s['runs']} |"
        )
    return rows


def grid_table(tables: dict[str, Any], budget: Budget, rates: dict, searched: dict) -> list[str]:
    rows = [
        "| task | method | dev score by learning rate (seed 0; chosen in bold; beyond the method's grid in "
        "italics) | chosen at the searched range's edge |",
        "|---|---|---|---|",
    ]
    for task in TASKS:
        for method in budget.methods:
            cells, grid = [], searched[task, method]
            for lr in grid:
                value = tables["grid"].get(f"{task}/{method}/{lr:g}", -math.inf)
                shown = "failed/–" if value == -math.inf else f"{value:.2f}"
                cell = f"{lr:g}: {shown}" if lr in budget.grid[method] else f"*{lr:g}: {shown}*"
                cells.append(f"**{cell}**" if rates.get((task, method)) == lr else cell)
            edge = len(grid) > 1 and rates.get((task, method)) in (min(grid), max(grid))
            rows.append(f"| {task} | {method} | {', '.join(cells)} | {'yes' if edge else ''} |")
    return rows


def mpt_table(tables: dict[str, Any], budget: Budget) -> list[str]:
    task = TASKS[MPT_TARGET]
    keys = (task.score, *task.extra)
    rows = [
        "| start of the target run | "
        + " | ".join(f"{s} {k}" for k in keys for s in ("dev", "test"))
        + " | seeds |",
        "|---|" + "---:|" * (2 * len(keys) + 1),
    ]
    names = {"scratch": "from scratch (a fresh prefix)"}
    for mix in budget.mixes:
        files = " + ".join(Path(f).parent.name for f in MIXES[mix])
        names[mix] = f"from a prefix pre-trained {budget.mpt_steps} steps on {files} ({mix})"
    for name, s in tables["mpt"].items():
        if s:
            scores = " | ".join(_cell(s[f"{split}/{key}"]) for key in keys for split in ("dev", "test"))
            rows.append(f"| {names[name]} | {scores} | {s['done']}/{s['runs']} |")
    return rows


def sweep_table(tables: dict[str, Any]) -> list[str]:
    rows = [
        "| task | prompt length | trainable | lr | dev | test | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, lengths in tables["sweep"].items():
        key = TASKS[task].score
        for length, s in lengths.items():
            trainable, _ = _count(s)
            rows.append(
                f"| {task} ({key}) | {length} | {trainable} | {s['learning_rate']:g} | {_cell(s[f'dev/{key}'])} | "
                f"{_cell(s[f'test/{key}'])} | {s['done']}/{s['runs']} |"
            )
    return rows


def claims_table(claims: dict[str, Any]) -> list[str]:
    rows = [
        "| claim (P-Tuning v2 paper) | verdict here | numbers (test, mean ± std over seeds) |",
        "|---|---|---|",
    ]
    for claim in claims.values():
        rows.append(f"| {claim['claim']} | **{claim['verdict']}** | {'<br>'.join(claim['rows'])} |")
    return rows


def render(report: dict[str, Any], budget: Budget) -> str:
    tables, rates = report["tables"], {tuple(k.split("/")): v for k, v in report["rates"].items()}
    searched = {tuple(k.split("/")): v for k, v in report["searched"].items()}
    done, planned = report["runs_done"], report["runs_planned"]
    status = (
        "" if done >= planned else f"**PARTIAL: {done} of {planned} runs done; missing runs show as –.**\n\n"
    )
    lines = [
        "# The P-Tuning v2 paper's claims on the embedded backbone (issue 14)",
        "",
        status
        + f"Command: `{report['command']}`"
        + (
            f" (this report rewritten from its runs by `{report['rewritten_by']}`)"
            if report.get("rewritten_by")
            else ""
        )
        + "  ",
        f"Date: {report['date']}  ",
        f"Machine: {report['machine']}; every run a fresh `python -m ptuning_v2.train` process with 1 torch "
        f"thread, {report['jobs']} at a time  ",
        f"Wall time: {report['wall_minutes']:.1f} min in {len(report['invocations'])} invocation(s) (a restart "
        f"skips the finished runs); the runs' wall time summed: "
        f"{report['run_minutes']:.1f} min; their CPU time summed: {report['cpu_minutes']:.1f} min "
        f"({report['cpu_minutes'] / 2:.1f} min of two otherwise idle cores)",
        "",
        f"Backbone `{report['model']}`. Budget: {budget.describe()}.",
        "Scores ×100; mean ± std over the seeds; train s is the Trainer's train_runtime (wall time, on a shared "
        "machine), run CPU s the whole process's CPU time (start-up, data, training, evaluation), peak RSS the "
        "whole process's (Python, torch and the model included). The tolerance for 'same' is the sum of the two stds "
        "(at least 0.5 points).",
        "",
        "## The paper's claims",
        "",
        "Verdicts: **pass** (every comparison the claim makes goes its way beyond the tolerance, or for 'match' "
        "stays within it), **fail** (some go against it and none its way), **not shown** (the differences are within "
        "the seeds' spread), **partly** (some comparisons pass, others do not).",
        "",
        *claims_table(report["claims"]),
    ]
    for task in TASKS.values():
        lines += [
            "",
            f"## {task.title} ({task.name})",
            "",
            *main_table(task, tables["main"][task.name], searched),
        ]
    lines += ["", "## Learning-rate grid", "", *grid_table(tables, budget, rates, searched)]
    lines += [
        "",
        "Where a grid's best dev score sat at its edge, one more rate a step beyond that edge was tried (in "
        "italics). A rate still chosen at the edge of what was searched means the best rate for this budget may "
        "lie further out: that method's scores are a lower bound of what it can do here.",
    ]
    lines += ["", f"## Multi-task prompt pre-training (P-Tuning v2, target {MPT_TARGET})", ""]
    lines += mpt_table(tables, budget)
    lines += ["", "## Prompt length (P-Tuning v2)", "", *sweep_table(tables)]
    failures = [f"- {rid}: {r['failed']}" for rid, r in sorted(report["runs"].items()) if "failed" in r]
    if failures:
        lines += ["", "## Failed runs (a diverged run ranks last in its grid)", "", *failures]
    return "\n".join(lines) + "\n"


def plot(tables: dict[str, Any], path: Path) -> None:
    """Test score against trainable parameters (log x), one panel per task, one point per method (± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4))
    for ax, (name, methods) in zip(axes, tables["main"].items()):
        key = TASKS[name].score
        for method, s in methods.items():
            score = s.get(f"test/{key}")
            if s.get("trainable") and score:
                ax.errorbar(s["trainable"], score[0], yerr=score[1], fmt="o", capsize=3)
                ax.annotate(
                    method, (s["trainable"], score[0]), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(f"test {key}")
        ax.set_title(TASKS[name].title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def json_ready(value: Any) -> Any:
    """JSON-ready: tuples as lists, -inf (a failed grid run) as None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(
    budget: Budget, paths: Paths, results: dict[str, dict], meta: dict[str, Any]
) -> dict[str, Any]:
    """``methods.md``, ``methods.png`` and ``methods.json`` from every result so far."""
    tables = summaries(budget, results)
    rates = chosen_rates(budget, results)
    planned = {run.id for runs in phases(budget, results) for run in runs}
    results = {rid: result for rid, result in results.items() if rid in planned}  # not other budgets' runs
    report = {
        **meta,
        "budget": asdict(budget),
        "rates": {f"{t}/{m}": lr for (t, m), lr in rates.items()},
        "searched": {f"{t}/{m}": list(lrs) for (t, m), lrs in searched_rates(budget, results).items()},
        "runs_done": len(results),
        "runs_planned": planned_count(budget, results),
        "run_minutes": sum(r["wall_seconds"] for r in results.values()) / 60,
        "cpu_minutes": sum(r.get("cpu_seconds", r["wall_seconds"]) for r in results.values()) / 60,
        "tables": tables,
        "claims": judge(tables),
        "runs": results,
    }
    write_results(paths.results, REPORT, render(report, budget), report)
    plot(tables, paths.results / f"{REPORT}.png")
    return report


def write_results(results: Path, name: str, markdown: str, report: dict) -> None:
    """``name``.md and ``name``.json into ``results``, each written whole (the plot is the caller's)."""
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / f"{name}.md", markdown)
    atomic_write_text(
        results / f"{name}.json", json.dumps(json_ready(report), indent=1, ensure_ascii=False) + "\n"
    )


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="smoke settings: 4 steps, P-Tuning v2 only, 2 seeds"
    )
    parser.add_argument("--model", default="models/glm-zh-tiny", help="backbone directory")
    parser.add_argument(
        "--data", default="data", help="the bundled data's directory (ner/, sentiment/, seg/, nlu/)"
    )
    parser.add_argument("--workdir", default="output/compare_methods", help="the runs' directories")
    parser.add_argument("--results", default=str(RESULTS), help="where methods.{md,png,json} go")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with one torch thread)")
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from finished runs")
    return parser.parse_args(argv)


def known_results(paths: Paths) -> dict[str, dict]:
    found = {}
    for file in sorted((paths.workdir / "runs").glob("*/result.json")):
        result = json.loads(file.read_text())
        found[result["run"]["id"]] = result
    return found


def invocations_of(paths: Paths) -> list[dict[str, Any]]:
    file = paths.workdir / "invocations.json"
    return json.loads(file.read_text()) if file.is_file() else []


def record_invocation(paths: Paths, started: str, minutes: float, command: str) -> list[dict[str, Any]]:
    """This invocation's wall time so far, beside the earlier ones' (a restart resumes them): every invocation."""
    invocations = [i for i in invocations_of(paths) if i["started"] != started]
    invocations.append({"started": started, "minutes": round(minutes, 2), "command": command})
    # Atomic: a run killed while writing must not leave a file that stops the restart from reading it.
    atomic_write_text(paths.workdir / "invocations.json", json.dumps(invocations, indent=1) + "\n")
    return invocations


def phases(budget: Budget, results: dict[str, dict]) -> Iterable[list[Run]]:
    """The runs of each phase; a phase's runs depend only on the results of the phases before it."""
    yield grid_runs(budget)
    yield edge_runs(budget, results)
    rates = chosen_rates(budget, results)
    yield seed_runs(budget, rates) + pretrain_runs(budget, rates) + sweep_runs(budget, rates)
    yield target_runs(budget, rates)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    budget = TINY if args.tiny else FULL
    paths = Paths(Path(args.model), Path(args.data), Path(args.workdir), Path(args.results))
    started = time.monotonic()
    command = os.environ.get("COMPARE_COMMAND") or " ".join(
        ["python -m benchmarks.compare_methods", *sys.argv[1:]]
    )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    def meta() -> dict[str, Any]:
        minutes = (time.monotonic() - started) / 60
        invocations = (
            record_invocation(paths, stamp, minutes, command)
            if not args.report_only
            else invocations_of(paths)
        )
        return {
            # The command that ran the runs; a --report_only rewrite is named beside it.
            "command": next((i["command"] for i in invocations if i.get("command")), command),
            "rewritten_by": command if args.report_only else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "model": str(paths.model),
            "jobs": args.jobs,
            "invocations": invocations,
            "wall_minutes": sum(i["minutes"] for i in invocations),
        }

    results = known_results(paths)
    if not args.report_only:
        total = planned_count(budget)
        initial = min(len(results), total)
        with tqdm(total=total, initial=initial, desc="runs", unit="run", file=sys.stdout) as bar:
            for runs in phases(budget, results):
                new = [run for run in runs if run.id not in results]  # a finished run is not run again
                results.update(execute_all(new, budget, paths, args.jobs, bar))
                bar.total = planned_count(budget, results)
                bar.refresh()
                write_report(budget, paths, results, meta())
    report = write_report(budget, paths, results, meta())
    print(f"{report['runs_done']}/{report['runs_planned']} runs; report: {paths.results / REPORT}.md")
    for claim in report["claims"].values():
        print(f"{claim['verdict']:>12}  {claim['claim']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
