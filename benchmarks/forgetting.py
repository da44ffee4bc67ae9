"""Forgetting, measured and mitigated (issue 24.3): what each method costs the backbone's general ability on
generative NER, without and with data mixing, against THUDM's "LoRA forgets less than P-Tuning v2" and "mixing
general data reduces forgetting".

    bash scripts/compare_methods.sh --forgetting           # -> benchmarks/results/forgetting.{md,png,json}
    bash scripts/compare_methods.sh --forgetting --tiny --model DIR --data DIR --workdir DIR --results DIR

P-Tuning v2, Prefix-Tuning, LoRA and full fine-tuning, each without mixing and with the bundled general chats at two
ratios of every batch (``--mix_ratio``), 3 seeds each, on the methods comparison's budget (``benchmarks.
compare_methods``: 150 steps of batch 16, prompt length 64, the first 100 dev / 200 test examples). Every run scores
the task (test entity F1) and the retention set of ``ptuning_v2.retention`` (held-out perplexity, copy probe,
verb listing), with its method and bare. Mixed runs train the same steps, so they see fewer task examples: the
trade-off the plot shows.

Learning rates are the methods comparison's, chosen there on dev at seed 0 (``benchmarks/results/methods.json``, when
its budget is this one); otherwise the comparison first runs that grid on generative NER (dev only) and chooses the
same way. Runs are the methods comparison's (``compare_methods.execute``: a fresh process each, two at a time, one
torch thread); a restart skips every finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import compare_methods as cm

TASK = "ner_gen"
REPORT = "forgetting"
# The retention metrics the report shows, and which way is better.
HIGHER_IS_BETTER = {"heldout-perplexity": False, "copy-exact": True, "copy-share": True, "listing-f1": True}
SHOWN = {
    "heldout-perplexity": "held-out perplexity ↓",
    "copy-exact": "exact copies % ↑",
    "copy-share": "copied share % ↑",
    "listing-f1": "verb listing F1 ↑",
}


@dataclass(frozen=True)
class ForgettingBudget:
    base: cm.Budget = cm.FULL
    methods: tuple[str, ...] = ("ptuning_v2", "prefix_tuning", "lora", "full")
    ratios: tuple[float, ...] = (0.0, 0.2, 0.5)
    grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(cm.GRID))

    def describe(self) -> str:
        mixed = " and ".join(f"{r:g}" for r in self.ratios if r)
        return (
            f"{self.base.steps} steps of batch {self.base.batch} (mixed runs: the same steps, {mixed} of each batch "
            f"from the bundled general chats); seeds {', '.join(map(str, self.base.seeds))}; prompt length "
            f"{self.base.pre_seq_len}; test entity F1 on the first {self.base.test_generation} test examples (greedy, "
            f"at most {self.base.max_new_tokens} new tokens); retention on ptuning_v2.retention's default set"
        )


FULL = ForgettingBudget()
TINY = ForgettingBudget(
    base=replace(cm.TINY, methods=("ptuning_v2", "lora")),
    methods=("ptuning_v2", "lora"),
    ratios=(0.0, 0.5),
    grid={"ptuning_v2": (1e-1,), "lora": (1e-2,)},
)


# ------------------------------------------------------------------------------------------------ the plan


def grid_budget(budget: ForgettingBudget) -> cm.Budget:
    return replace(budget.base, methods=budget.methods, grid=budget.grid)


def committed_rates(budget: ForgettingBudget, report: Path) -> dict[str, float] | None:
    """The learning rates the methods comparison chose on dev for generative NER, when its report is of this budget
    (steps, batch, prompt length, dev size) and names every method; else None."""
    if not report.is_file():
        return None
    found = json.loads(report.read_text())
    same = ("steps", "batch", "pre_seq_len", "dev_generation", "max_new_tokens")
    if any(found.get("budget", {}).get(k) != getattr(budget.base, k) for k in same):
        return None
    rates = {m: found.get("rates", {}).get(f"{TASK}/{m}") for m in budget.methods}
    return rates if all(rates.values()) else None


def grid_runs(budget: ForgettingBudget, results: dict[str, dict]) -> list[cm.Run]:
    """The methods comparison's grid (and one step beyond an edge, once the grid is done) on generative NER."""
    base = grid_budget(budget)
    return [r for r in cm.grid_runs(base) + cm.edge_runs(base, results) if r.task == TASK]


def chosen_rates(budget: ForgettingBudget, results: dict[str, dict]) -> dict[str, float]:
    return {m: lr for (t, m), lr in cm.chosen_rates(grid_budget(budget), results).items() if t == TASK}


def forgetting_runs(budget: ForgettingBudget, rates: dict[str, float]) -> list[cm.Run]:
    return [
        cm.Run(
            TASK, m, rates[m], seed, budget.base.pre_seq_len, budget.base.steps, mix_ratio=r, retention=True
        )
        for m in budget.methods
        for r in budget.ratios
        for seed in budget.base.seeds
    ]


# ------------------------------------------------------------------------------------------------ summaries


def summarise(runs: list[cm.Run], results: dict[str, dict]) -> dict[str, Any]:
    done = [results[r.id] for r in runs if r.id in results and "failed" not in results[r.id]]
    score = cm.TASKS[TASK].score
    after = [d.get("retention", {}).get("after", {}) for d in done]
    before = [d.get("retention", {}).get("before", {}) for d in done]
    return {
        "runs": len(runs),
        "done": len(done),
        "failed": [results[r.id]["failed"] for r in runs if r.id in results and "failed" in results[r.id]],
        "learning_rate": runs[0].learning_rate,
        "dev": cm.mean_std([d["dev"][score] for d in done if score in d.get("dev", {})]),
        "test": cm.mean_std([d["test"][score] for d in done if score in d.get("test", {})]),
        "retention": {k: cm.mean_std([a[k] for a in after if k in a]) for k in HIGHER_IS_BETTER},
        "backbone": {k: cm.mean_std([b[k] for b in before if k in b]) for k in HIGHER_IS_BETTER},
        "cpu_seconds": cm.mean_std([d["cpu_seconds"] for d in done if d.get("cpu_seconds") is not None]),
    }


def tables(budget: ForgettingBudget, rates: dict[str, float], results: dict[str, dict]) -> dict[str, Any]:
    runs = forgetting_runs(budget, rates) if rates else []
    return {
        m: {
            f"{r:g}": summarise([x for x in runs if x.method == m and x.mix_ratio == r], results)
            for r in budget.ratios
        }
        for m in budget.methods
        if runs
    }


# ------------------------------------------------------------------------------------------------ the two claims


def better(a: tuple[float, float] | None, b: tuple[float, float] | None, key: str) -> str | None:
    """``a`` against ``b`` on a retention metric: 'better', 'worse' or 'same' (within the sum of the stds)."""
    verdict = cm.compare(a, b)
    if verdict in (None, "same"):
        return verdict
    return "better" if (verdict == "higher") == HIGHER_IS_BETTER[key] else "worse"


def _shown(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def claim_lora_forgets_less(table: dict[str, Any]) -> dict[str, Any]:
    """Without mixing, LoRA keeps more of the backbone's general ability than P-Tuning v2, on every metric."""
    lora, prefix = (table.get(m, {}).get("0", {}).get("retention", {}) for m in ("lora", "ptuning_v2"))
    checks, rows = [], []
    for key in HIGHER_IS_BETTER:
        verdict = better(lora.get(key), prefix.get(key), key)
        checks.append(verdict and {"better": "pass", "same": "not shown", "worse": "fail"}[verdict])
        rows.append(f"{SHOWN[key]}: LoRA {_shown(lora.get(key))} vs P-Tuning v2 {_shown(prefix.get(key))}")
    return cm.combined_verdict(checks, rows)


def claim_mixing_helps(table: dict[str, Any]) -> dict[str, Any]:
    """Every method keeps more general ability with general data mixed in, at each ratio, on every metric."""
    checks, rows = [], []
    for method, by_ratio in table.items():
        plain = by_ratio.get("0", {}).get("retention", {})
        for ratio, summary in by_ratio.items():
            if ratio == "0":
                continue
            mixed = summary.get("retention", {})
            verdicts = {k: better(mixed.get(k), plain.get(k), k) for k in HIGHER_IS_BETTER}
            checks += [
                v and {"better": "pass", "same": "not shown", "worse": "fail"}[v] for v in verdicts.values()
            ]
            rows.append(
                f"{method} mix {ratio}: "
                + ", ".join(
                    f"{SHOWN[k]} {_shown(mixed.get(k))} vs {_shown(plain.get(k))}" for k in HIGHER_IS_BETTER
                )
            )
    return cm.combined_verdict(checks, rows)


CLAIMS = {
    "lora": ("LoRA forgets less than P-Tuning v2 (THUDM, ChatGLM-6B #730)", claim_lora_forgets_less),
    "mixing": (
        "Mixing general data into training reduces forgetting (THUDM, ChatGLM-6B #730)",
        claim_mixing_helps,
    ),
}


# ------------------------------------------------------------------------------------------------ the report


def render(report: dict[str, Any], budget: ForgettingBudget) -> str:
    done, planned = report["runs_done"], report["runs_planned"]
    status = (
        "" if done >= planned else f"**PARTIAL: {done} of {planned} runs done; missing runs show as –.**\n\n"
    )
    rates = ", ".join(f"{m} {lr:g}" for m, lr in report["rates"].items())
    lines = [
        "# Forgetting: what each method costs the backbone's general ability, and data mixing (issue 24)",
        "",
        status + f"Command: `{report['command']}`  ",
        f"Date: {report['date']}  ",
        f"Machine: {report['machine']}; every run a fresh `python -m ptuning_v2.train` process with 1 torch "
        f"thread, {report['jobs']} at a time  ",
        f"Wall time: {report['wall_minutes']:.1f} min in {len(report['invocations'])} invocation(s); the runs' CPU "
        f"time summed: {report['cpu_minutes']:.1f} min",
        "",
        f"Backbone `{report['model']}`. Budget: {budget.describe()}. Learning rates ({report['rates_from']}): {rates}.",
        "Mean ± std over the seeds. 'Same' is within the sum of the two stds (at least 0.5).",
        "",
        "## The claims",
        "",
        "| claim | verdict here | numbers (mean ± std over seeds) |",
        "|---|---|---|",
    ]
    for claim in report["claims"].values():
        lines.append(f"| {claim['claim']} | **{claim['verdict']}** | {'<br>'.join(claim['rows'])} |")
    backbone = next(
        (s["backbone"] for by_ratio in report["tables"].values() for s in by_ratio.values() if s["done"]), {}
    )
    lines += [
        "",
        "## Task score and retention",
        "",
        "The backbone alone: " + ", ".join(f"{SHOWN[k]} {_shown(backbone.get(k))}" for k in HIGHER_IS_BETTER),
        "",
        "| method | mix ratio | lr | dev entity F1 | test entity F1 | "
        + " | ".join(SHOWN[k] for k in HIGHER_IS_BETTER)
        + " | run CPU s | seeds |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(HIGHER_IS_BETTER) + "---:|---:|",
    ]
    for method, by_ratio in report["tables"].items():
        for ratio, s in by_ratio.items():
            cpu = s["cpu_seconds"]
            lines.append(
                f"| {method} | {ratio} | {s['learning_rate']:g} | {_shown(s['dev'])} | {_shown(s['test'])} | "
                + " | ".join(_shown(s["retention"][k]) for k in HIGHER_IS_BETTER)
                + f" | {'–' if not cpu else f'{cpu[0]:.0f}'} | {s['done']}/{s['runs']} |"
            )
    failures = [f"- {rid}: {r['failed']}" for rid, r in sorted(report["runs"].items()) if "failed" in r]
    if failures:
        lines += ["", "## Failed runs", "", *failures]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    """Test entity F1 against each retention metric, one line per method through its mix ratios (± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(HIGHER_IS_BETTER)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8))
    for ax, key in zip(axes, keys):
        for method, by_ratio in table.items():
            points = [
                (s["retention"][key], s["test"], ratio)
                for ratio, s in by_ratio.items()
                if s["retention"].get(key) and s.get("test")
            ]
            if not points:
                continue
            xs, ys = [p[0][0] for p in points], [p[1][0] for p in points]
            line = ax.errorbar(
                xs, ys, xerr=[p[0][1] for p in points], yerr=[p[1][1] for p in points], fmt="o-", capsize=2,
                label=method,
            )  # fmt: skip
            for (x, y), (_, _, ratio) in zip(zip(xs, ys), points):
                ax.annotate(f"{ratio}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                            color=line[0].get_color())  # fmt: skip
        ax.set_xlabel(SHOWN[key])
        ax.set_ylabel("test entity F1")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # a partial report may have nothing to plot yet
        axes[0].legend(fontsize=8, title="method (labels: mix ratio)", title_fontsize=7)
    fig.suptitle("Task score against retention, generative NER (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan(
    budget: ForgettingBudget, rates: dict[str, float] | None, chosen_here: bool, results: dict[str, dict]
) -> list[cm.Run]:
    """Every run of the comparison so far known: the grid when the rates are chosen here, then the forgetting runs."""
    runs = grid_runs(budget, results) if chosen_here else []
    return runs + (forgetting_runs(budget, rates) if rates else [])


def planned_count(budget: ForgettingBudget, chosen_here: bool, results: dict[str, dict]) -> int:
    grid = len(grid_runs(budget, results)) if chosen_here else 0
    return grid + len(budget.methods) * len(budget.ratios) * len(budget.base.seeds)


def write_report(
    budget: ForgettingBudget,
    paths: cm.Paths,
    results: dict[str, dict],
    rates: dict[str, float],
    rates_from: str,
    chosen_here: bool,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """``forgetting.md``, ``forgetting.png`` and ``forgetting.json`` from every result so far."""
    table = tables(budget, rates, results)
    ours = {r.id for r in plan(budget, rates, chosen_here, results)}
    kept = {rid: r for rid, r in results.items() if rid in ours}  # not other budgets' runs
    report = {
        **meta,
        "budget": {**asdict(budget), "base": asdict(budget.base)},
        "rates": rates,
        "rates_from": rates_from,
        "runs_done": len(kept),
        "runs_planned": planned_count(budget, chosen_here, results),
        "cpu_minutes": sum(r.get("cpu_seconds", r["wall_seconds"]) for r in kept.values()) / 60,
        "tables": table,
        "claims": {name: {"claim": text, **check(table)} for name, (text, check) in CLAIMS.items()},
        "runs": kept,
    }
    cm.write_results(paths.results, REPORT, render(report, budget), report)
    plot(table, paths.results / f"{REPORT}.png")
    return report


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="smoke settings: 4 steps, 2 methods, 2 ratios, 2 seeds"
    )
    parser.add_argument("--model", default="models/glm-zh-tiny", help="backbone directory")
    parser.add_argument(
        "--data", default="data", help="the bundled data's directory (ner/, seg/, pretrain/, general/)"
    )
    parser.add_argument("--workdir", default="output/forgetting", help="the runs' directories")
    parser.add_argument("--results", default=str(cm.RESULTS), help="where forgetting.{md,png,json} go")
    parser.add_argument(
        "--rates_from", default=str(cm.RESULTS / f"{cm.REPORT}.json"), help="the methods comparison's report"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with one torch thread)")
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from finished runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    budget = TINY if args.tiny else FULL
    paths = cm.Paths(Path(args.model), Path(args.data), Path(args.workdir), Path(args.results))
    started = time.monotonic()
    command = os.environ.get("COMPARE_COMMAND") or " ".join(
        ["python -m benchmarks.forgetting", *sys.argv[1:]]
    )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    def meta() -> dict[str, Any]:
        minutes = (time.monotonic() - started) / 60
        invocations = (
            cm.record_invocation(paths, stamp, minutes, command)
            if not args.report_only
            else cm.invocations_of(paths)
        )
        return {
            "command": next((i["command"] for i in invocations if i.get("command")), command),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": cm.machine(),
            "model": str(paths.model),
            "jobs": args.jobs,
            "invocations": invocations,
            "wall_minutes": sum(i["minutes"] for i in invocations),
        }

    results = cm.known_results(paths)
    rates = committed_rates(budget, Path(args.rates_from))
    chosen_here = rates is None
    rates_from = "chosen here on dev at seed 0 (the methods grid)" if chosen_here else (
        f"the methods comparison's, chosen on dev at seed 0 ({args.rates_from})"
    )  # fmt: skip
    if not args.report_only:
        done = lambda: sum(r.id in results for r in plan(budget, rates, chosen_here, results))  # noqa: E731
        with tqdm(total=planned_count(budget, chosen_here, results), initial=done(), desc="runs", unit="run",
                  file=sys.stdout) as bar:  # fmt: skip
            if chosen_here:
                for _ in range(2):  # the grid, then one step beyond an edge where the grid's best sits there
                    new = [r for r in grid_runs(budget, results) if r.id not in results]
                    results.update(cm.execute_all(new, budget.base, paths, args.jobs, bar))
                    bar.total = planned_count(budget, chosen_here, results)
                rates = chosen_rates(budget, results)
            new = [r for r in forgetting_runs(budget, rates) if r.id not in results]
            results.update(cm.execute_all(new, budget.base, paths, args.jobs, bar))
    elif chosen_here:
        rates = chosen_rates(budget, results)
    report = write_report(budget, paths, results, rates, rates_from, chosen_here, meta())
    print(f"{report['runs_done']}/{report['runs_planned']} runs; report: {paths.results / REPORT}.md")
    for claim in report["claims"].values():
        print(f"{claim['verdict']:>12}  {claim['claim']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
