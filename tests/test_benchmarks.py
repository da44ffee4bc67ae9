"""Smoke test of the performance benchmarks: each runs end to end on its tiniest settings and prints its JSON line.

Speed is never asserted (the figures come from one round on a shared machine); only that every key is there and is
a positive finite number. About 60 s together on 2 cores, most of it in the memory probes' fresh interpreters.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAIN_KEYS = {
    "pt2_vs_peft_tokens_per_s",
    "pt2_vs_full_tokens_per_s",
    "pt2_vs_limit_step_time",
    "int4_vs_fp32_peak_mem",
    "ckpt_vs_no_ckpt_activation_mem",
}
GENERATE_KEYS = {"batched_vs_batch1_tokens_per_s", "prefix_vs_base_decode_time"}


def results_state() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("performance.*")}


def run_benchmark(name: str) -> dict:
    """``python -m benchmarks.<name> --quick --tiny`` offline; its last stdout line, parsed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    before = results_state()
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert results_state() == before, "--quick must leave the quoted results in benchmarks/results/ alone"
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_positive_finite(values: dict, keys: set[str]) -> None:
    missing = keys - values.keys()
    assert not missing, f"missing keys: {sorted(missing)}"
    for key in keys:
        value = values[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


@pytest.mark.slow
def test_train_benchmark_quick_prints_every_ratio():
    assert_positive_finite(run_benchmark("train"), TRAIN_KEYS)


def test_generate_benchmark_quick_prints_every_ratio():
    assert_positive_finite(run_benchmark("generate"), GENERATE_KEYS)


def test_every_report_names_the_cpu_kind(tmp_path):
    from benchmarks.report import cpu_kind

    def kind(flags: str) -> str:
        (tmp_path / "cpuinfo").write_text(
            f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 {flags}\n"
        )
        return cpu_kind(tmp_path / "cpuinfo")

    assert kind("avx2 avx512f avx512_bf16") == "AMD EPYC, AVX512-BF16"
    assert kind("avx2 avx512f avx512_bf16 amx_bf16") == "AMD EPYC, AVX512-BF16 + AMX-BF16"
    assert kind("avx2 avx512f") == "AMD EPYC, AVX512 (no BF16)"
    assert kind("avx avx2 fma") == "AMD EPYC, AVX2-only"
    assert cpu_kind(tmp_path / "missing").endswith(", CPU kind unknown")
