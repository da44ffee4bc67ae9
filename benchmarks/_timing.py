"""What the performance benchmarks (``benchmarks.train``, ``benchmarks.generate``) share.

- Timing: contenders run in alternating rounds inside one process and each reports the median and min-max of its
  rounds, so a neighbour's load on a shared machine slows every contender alike and the ratios survive it.
- Memory: peak resident memory of this process on the CPU (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``
  so model loading does not count), ``torch.cuda.max_memory_allocated`` on a GPU.
- The report: ``benchmarks/results/performance.{json,md,png}``. Each benchmark writes its own section into the JSON
  file and re-renders the markdown and the plot from all sections, so either can be rerun alone. A block of
  hand-written notes between the ``NOTES`` markers in the markdown survives the rewrite.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import cpu_kind

RESULTS = Path(__file__).resolve().parent / "results"
REPORT_NAME = "performance"
NOTES_BEGIN = "<!-- NOTES: hand-written, kept when the benchmarks rewrite this file -->"
NOTES_END = "<!-- /NOTES -->"

# The targets: key -> (direction, bound, what is compared). The benchmarks emit every key.
TARGETS: dict[str, tuple[str, float, str]] = {
    "pt2_vs_peft_tokens_per_s": (">=", 1.0, "P-Tuning v2 vs PEFT prefix tuning, training tokens/s"),
    "pt2_vs_full_tokens_per_s": (">=", 1.4, "P-Tuning v2 vs full fine-tuning, training tokens/s"),
    "pt2_vs_limit_step_time": (
        "<=",
        1.10,
        "P-Tuning v2 step time vs the limit (frozen model, grad to embeddings)",
    ),
    "int4_vs_fp32_peak_mem": ("<=", 0.35, "int4 vs fp32 backbone, peak training memory (300M config)"),
    "ckpt_vs_no_ckpt_activation_mem": (
        "<=",
        0.5,
        "gradient checkpointing vs none, activation memory (seq 1024)",
    ),
    "batched_vs_batch1_tokens_per_s": (">=", 6.0, "generation at batch 16 vs batch 1, tokens/s"),
    "prefix_vs_base_decode_time": ("<=", 1.10, "decode time per token, 128-token prefix vs none"),
}


# ----------------------------------------------------------------------------------------------------- timing
def run_with_passive_openmp(module: str) -> None:
    """Re-execute ``python -m <module>`` with ``OMP_WAIT_POLICY=PASSIVE`` unless the policy is already set.

    On a shared machine torch's OpenMP threads spin at every barrier waiting for a partner that another process
    holds off its core: with three other jobs on these 2 cores a glm-zh-tiny training step took 6.1 s with
    spinning threads and 0.48 s with passive ones (0.15 s on an idle machine). OpenMP reads the policy when torch
    loads it, so it has to be in the environment before the interpreter starts.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    # GPU kernels run asynchronously: a timer must wait for them.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], Any], calls: int = 1) -> float:
    """Wall time of one call of ``fn``, averaged over ``calls`` consecutive calls."""
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - start) / calls


def alternate(
    contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, calls: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each contender, one value per round; every round runs each contender once.

    The starting contender rotates from round to round, so none always runs first (after another one's garbage)
    or last. Warm-up calls (oneDNN kernel selection, first allocations, lazy initialisation) are not timed.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    names = list(contenders)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rounds[name].append(seconds_per_call(contenders[name], calls))
    return rounds


def summary(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max of a contender's rounds."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# ----------------------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS shows what is alive, not what loading left."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def current_memory() -> int:
    """Bytes in use now: allocated CUDA memory on a GPU, resident set size on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    kb = _proc_status_kb("VmRSS")
    return kb * 1024 if kb is not None else 0


def reset_peak_memory() -> bool:
    """Start a new peak from now; False where the platform cannot (the peak then includes what came before)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: 5 resets the peak RSS (VmHWM)
        return True
    except OSError:
        return False


def peak_memory() -> int:
    """Peak bytes since the last reset (GPU: allocated by torch; CPU: resident set size)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    kb = _proc_status_kb("VmHWM")
    if kb is None:  # no /proc: the lifetime peak (kilobytes on Linux)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


# ---------------------------------------------------------------------------------------------------- machine
def machine() -> str:
    """CPU model, kind and count, memory, torch threads, GPU if any, load average when measured."""
    cpu = f"{cpu_kind()}, {os.cpu_count()} CPUs"
    memory_kb = None
    try:
        memory_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        pass
    parts = [
        cpu,
        f"{memory_kb / 2**20:.0f} GiB" if memory_kb else None,
        f"{torch.get_num_threads()} torch threads",
    ]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    parts.append(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    parts.append(f"load average {os.getloadavg()[0]:.2f} at the end")
    return ", ".join(p for p in parts if p)


def versions() -> str:
    import bitsandbytes
    import peft
    import transformers

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}"
    )


def code_version() -> str:
    """The commit measured, and whether the working tree differed from it."""
    root = RESULTS.parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {commit}" + (" with uncommitted changes" if dirty else "")


def print_json_line(values: dict[str, Any]) -> None:
    """The benchmark's machine-readable result: one JSON object on one line, last."""
    print(json.dumps(values, sort_keys=True), flush=True)


def finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------------------------------- report
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _kept_notes(path: Path) -> str:
    text = path.read_text() if path.exists() else ""
    start, end = text.find(NOTES_BEGIN), text.find(NOTES_END)
    if start < 0 or end < start:
        return f"{NOTES_BEGIN}\n{NOTES_END}"
    return text[start : end + len(NOTES_END)]


def _target_rows(headline: dict[str, Any]) -> list[str]:
    rows = ["| target | measured | goal | met |", "|---|---:|---:|:---:|"]
    for key, (direction, bound, what) in TARGETS.items():
        value = headline.get(key)
        if value is None:
            rows.append(f"| {what} (`{key}`) | not measured | {direction} {bound:g} | |")
            continue
        met = value >= bound if direction == ">=" else value <= bound
        rows.append(
            f"| {what} (`{key}`) | {value:.3f} | {direction} {bound:g} | {'yes' if met else '**no**'} |"
        )
    return rows


def write_section(section: str, markdown: str, raw: dict[str, Any], headline: dict[str, Any]) -> Path:
    """Store one benchmark's results and re-render ``performance.md`` and ``performance.png`` from all of them."""
    json_path = RESULTS / f"{REPORT_NAME}.json"
    md_path = RESULTS / f"{REPORT_NAME}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = _read_json(json_path)
    data[section] = {"markdown": markdown, "headline": headline, "raw": raw}
    json_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    combined: dict[str, Any] = {}
    for name in ("train", "generate"):
        combined.update(data.get(name, {}).get("headline", {}))
    parts = [
        "# Performance: training and generation speed, memory",
        "",
        "Written by `python -m benchmarks.train` and `python -m benchmarks.generate` (each rewrites its own section "
        "from `performance.json`). Ratios come from contenders measured in the same process in alternating rounds; "
        "each figure is the median of the rounds, with min-max beside it.",
        "",
        "## Targets",
        "",
        *_target_rows(combined),
        "",
    ]
    for name in ("train", "generate"):
        if name in data:
            parts += [data[name]["markdown"].rstrip(), ""]
    parts += [_kept_notes(md_path), ""]
    md_path.write_text("\n".join(parts))
    plot(data, RESULTS / f"{REPORT_NAME}.png")
    return md_path


def plot(data: dict[str, Any], path: Path) -> None:
    """Left: training tokens/s per method and backbone; right: each target's ratio against its bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    bars = data.get("train", {}).get("raw", {}).get("plot_bars", [])
    if bars:
        labels = [b["label"] for b in bars]
        medians = [b["median"] for b in bars]
        errors = [[b["median"] - b["min"] for b in bars], [b["max"] - b["median"] for b in bars]]
        left.barh(labels, medians, xerr=errors, color=[b.get("color", "tab:blue") for b in bars])
        left.invert_yaxis()
        left.set_xlabel("training tokens/s (median, min-max)")
        left.set_title(data["train"]["raw"].get("plot_title", "training throughput"))
    combined: dict[str, Any] = {}
    for name in ("train", "generate"):
        combined.update(data.get(name, {}).get("headline", {}))
    keys = [k for k in TARGETS if combined.get(k) is not None]
    # Normalise so that 1.0 is the bound for every target and left of it is a miss.
    scores = [
        combined[k] / TARGETS[k][1] if TARGETS[k][0] == ">=" else TARGETS[k][1] / combined[k] for k in keys
    ]
    right.barh(keys, scores, color=["tab:green" if s >= 1 else "tab:red" for s in scores])
    right.axvline(1.0, color="black", linestyle="--", linewidth=1)
    right.invert_yaxis()
    right.set_xlabel("measured / target (>= 1: target met)")
    right.set_title("targets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
