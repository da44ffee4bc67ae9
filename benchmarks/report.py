"""How every benchmark reports: a markdown table with the date and machine under it, printed and written,
with the raw numbers, to ``<out>.md`` and ``<out>.json``; and ``cpu_kind``, which every benchmark's machine line
names."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

# The instruction sets that choose torch's (and bitsandbytes') CPU float kernels. Results measured on CPUs of different
# kinds differ in their last digits, and a training run follows another trajectory (README: "The digits hold on one
# kind of CPU"), so every result names its kind.
_BF16_FLAGS = (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))


def cpu_kind(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name and kind, e.g. ``AMD EPYC, AVX512-BF16`` or ``AMD EPYC, AVX2-only`` ("CPU kind
    unknown" where ``cpuinfo`` cannot be read: not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()}, CPU kind unknown"
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value for key, value in pairs}  # the last processor's; "model name\t: AMD EPYC"
    model = fields.get("model name", "").strip() or platform.machine()
    flags = set(fields.get("flags", "").split())
    kind = " + ".join(name for flag, name in _BF16_FLAGS if flag in flags)
    if not kind:
        kind = "AVX512 (no BF16)" if "avx512f" in flags else "AVX2-only" if "avx2" in flags else "no AVX2"
    return f"{model}, {kind}"


def write_report(out: str | Path, table: list[str], settings: str, raw: dict) -> str:
    """Print and save ``table`` followed by ``<date>, <machine>, <settings>``; return the markdown text."""
    import torch  # here, not at the top: cpu_kind serves parents that keep torch out of their process

    machine = f"{cpu_kind()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    text = "\n".join(table) + f"\n\n{time.strftime('%Y-%m-%d')}, {machine}, {settings}\n"
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    return text
