"""Training speed and memory of P-Tuning v2 against Prefix-Tuning, HF PEFT prefix tuning, LoRA, full fine-tuning
and "the limit", on fp32, bf16, int8 and int4 backbones, with and without gradient checkpointing.

    python -m benchmarks.train            # full mode: ~15 min on 2 CPU cores; writes benchmarks/results/performance.*
    python -m benchmarks.train --quick    # smoke run (< 60 s): a few contenders, 1 round, writes nothing
    python -m benchmarks.train --quick --tiny   # the test's run: smaller still

What is measured, and why so:

- Throughput (training tokens/s) on the embedded ``models/glm-zh-tiny``. For each setting (backbone, sequence
  length, checkpointing) every contender gets the same batch and is built in this one process; the contenders then
  run in alternating rounds, so a neighbour's load on a shared machine slows all of them alike.
- "The limit" is the frozen backbone with no prefix, run forward and backward to its input embeddings: the least
  work any method that trains something below the last layer can do. P-Tuning v2 adds only the prefix's keys to
  every attention, so its step time should stay close to it.
- Memory on a random GLM of about 300M parameters, one fresh subprocess per configuration, so no allocation of
  another configuration stays in the process: peak resident memory on the CPU (``torch.cuda.max_memory_allocated``
  on a GPU) from just before the first forward. "Activation memory" is that peak minus the memory right before
  the first forward; "training memory" is the peak minus the process's memory after its imports (what the
  training itself holds: weights, activations, gradients, optimizer state).
- A profile (torch.profiler) of P-Tuning v2 against the limit shows where any extra time goes.

Ends by printing one JSON line with the headline ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GlmConfig, GlmForCausalLM, PreTrainedModel

from benchmarks._timing import (
    alternate,
    code_version,
    current_memory,
    device,
    machine,
    peak_memory,
    print_json_line,
    ratio,
    release_freed_memory,
    reset_peak_memory,
    run_with_passive_openmp,
    seconds_per_call,
    summary,
    versions,
    write_section,
)

# The package's public names: they stay put while the modules behind them are reshaped.
from ptuning_v2 import PrefixConfig, attach_prefix
from ptuning_v2.quantization import prepare_4bit_for_cpu

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "models/glm-zh-tiny"  # as shown; loaded from ROOT
PRE_SEQ_LEN = 128
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = {
    "pt2": "P-Tuning v2 (ours)",
    "prefix": "Prefix-Tuning (ours, MLP)",
    "peft_prefix": "PEFT prefix tuning",
    "lora": "LoRA r=8 (PEFT)",
    "full": "full fine-tuning",
    "limit": "limit (frozen, grad to embeddings)",
}
BACKBONES = ("fp32", "bf16", "int8", "int4")
# int4 computes in fp32, as `--quantization_bit 4` does by default on CPUs without AVX512-BF16/AMX
# (ptuning_v2.quantization.cpu_compute_dtype), so the fp32/int4 comparison isolates the weights' storage; "int4-bf16"
# (nf4 weights, bf16 compute and embeddings) is what `--quantization_bit 4` does by default on CPUs with them, and
# "int8-bf16" the same for LLM.int8.
COMPUTE_DTYPE = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.float32,
    "int4": torch.float32,
    "int4-bf16": torch.bfloat16,
    "int8-bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class Setting:
    """What every contender of one comparison shares."""

    backbone: str
    seq_len: int
    batch_size: int
    checkpointing: bool
    model: str = "tiny"  # a key of MODEL_NAMES

    def label(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "no ckpt"
        model = "" if self.model == "tiny" else f"{MODEL_NAMES[self.model]}, "
        return f"{model}{self.backbone}, {self.batch_size}x{self.seq_len}, {ckpt}"

    def where(self) -> dict[str, Any]:
        """The fields that pick this setting's rows out of the results."""
        return {k: v for k, v in asdict(self).items() if k != "batch_size"}


@dataclass(frozen=True)
class Plan:
    """How much the run measures: full mode, --quick, --quick --tiny."""

    throughput_settings: tuple[Setting, ...]
    methods: tuple[str, ...]
    repeats: int
    warmup: int
    calls: int  # training steps per timed round
    memory_config: dict[str, Any]  # GlmConfig arguments of the memory model
    memory_probes: tuple[dict[str, Any], ...]  # method, backbone, seq_len, checkpointing, steps
    profile_steps: int


def _grid(seq_batches: dict[int, int], backbones: tuple[str, ...]) -> tuple[Setting, ...]:
    return tuple(
        Setting(backbone, seq_len, batch, ckpt)
        for backbone in backbones
        for seq_len, batch in seq_batches.items()
        for ckpt in (False, True)
    )


def _probes(seq_short: int, seq_long: int, full_set: bool) -> tuple[dict[str, Any], ...]:
    """Memory configurations: every backbone with our prefix; the peers at fp32; checkpointing at the long length."""
    backbones = (*BACKBONES, "int4-bf16") if full_set else BACKBONES
    probes = [
        dict(method="pt2", backbone=b, seq_len=seq_short, checkpointing=False, steps=2) for b in backbones
    ]
    if full_set:
        probes += [
            dict(method=m, backbone="fp32", seq_len=seq_short, checkpointing=False, steps=2)
            for m in ("peft_prefix", "lora", "full", "limit")
        ]
    # One step: the prefix's optimizer state is tiny, so the first step's peak is the peak.
    probes += [
        dict(method="pt2", backbone="fp32", seq_len=seq_long, checkpointing=c, steps=1) for c in (False, True)
    ]
    return tuple(probes)


# About 300M parameters: 24 layers x 11.3M (GQA attention 2.6M + gated MLP 8.7M) + a 32.8M tied embedding.
MEMORY_300M = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    tie_word_embeddings=True,
)
# The 300M model's layers, 6 of them (100M): wide enough that attention is a small share of a step.
WIDE = {**MEMORY_300M, "num_hidden_layers": 6}
MODEL_NAMES = {"tiny": TINY_MODEL, "wide": "random GLM 1024 wide, 6 layers (100M)"}
MEMORY_SMALL = dict(  # --quick: the same shape, 1/20 of the size
    vocab_size=8000,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
)

FULL_PLAN = Plan(
    # The wider random GLM checks how the ratios move when the linear layers outweigh attention more.
    throughput_settings=(*_grid({256: 4, 1024: 1}, BACKBONES), Setting("fp32", 256, 1, False, model="wide")),
    methods=tuple(METHODS),
    repeats=5,
    warmup=2,
    calls=2,
    memory_config=MEMORY_300M,
    memory_probes=_probes(256, 1024, full_set=True),
    profile_steps=4,
)
QUICK_PLAN = Plan(
    throughput_settings=(Setting("fp32", 128, 2, False),),
    methods=("pt2", "peft_prefix", "full", "limit"),
    repeats=1,
    warmup=1,
    calls=2,
    memory_config=MEMORY_SMALL,
    memory_probes=(
        dict(method="pt2", backbone="fp32", seq_len=256, checkpointing=False, steps=1),
        dict(method="pt2", backbone="int4", seq_len=256, checkpointing=False, steps=1),
        dict(method="pt2", backbone="fp32", seq_len=256, checkpointing=True, steps=1),
    ),
    profile_steps=0,
)
TINY_PLAN = replace(
    QUICK_PLAN,
    throughput_settings=(Setting("fp32", 32, 2, False),),
    calls=1,
    memory_config={**MEMORY_SMALL, "num_hidden_layers": 2, "vocab_size": 1000},
    memory_probes=tuple({**p, "seq_len": 64} for p in QUICK_PLAN.memory_probes),
)


# ------------------------------------------------------------------------------------------------- contenders
def quiet() -> None:
    """Silence what every contender repeats at each step (use_cache vs checkpointing, bitsandbytes' fp16 cast)."""
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _read_not_mapped() -> dict[str, Any]:
    # Weights memory-mapped from safetensors are file-backed: fp32 ones are used in place (and counted in RSS only
    # once touched), while a quantised load leaves the whole mapped file resident. Reading the file into memory
    # makes every format's weights ordinary allocations, counted alike (transformers >= 5.24 has the option).
    parameters = inspect.signature(PreTrainedModel.from_pretrained).parameters
    return {"disable_mmap": True} if "disable_mmap" in parameters else {}


def load_backbone(model_dir: str, backbone: str) -> nn.Module:
    """The frozen-to-be backbone in one of the four storage formats, on this machine's device."""
    dtype = COMPUTE_DTYPE[backbone]
    target = device()
    if backbone in ("fp32", "bf16"):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **_read_not_mapped()).to(target)
    if backbone.startswith("int8"):
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    device_map = {"": target.index or 0} if target.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quant, device_map=device_map, **_read_not_mapped()
    )
    if backbone.startswith("int4"):
        prepare_4bit_for_cpu(model)  # layers bitsandbytes' packed CPU kernel cannot take; inert on a GPU
    return model


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens (speed does not depend on the text), labels on every token, no padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator).to(device())
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def enable_checkpointing(model: nn.Module) -> None:
    # Non-reentrant: the prefix reaches the layers inside the cache, not as a tensor argument.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def apply_method(model: nn.Module, method: str, checkpointing: bool) -> nn.Module:
    """The model as ``method`` trains it; raises where the method refuses the setting."""
    if method in ("pt2", "prefix"):
        model = attach_prefix(
            model, PrefixConfig(pre_seq_len=PRE_SEQ_LEN, prefix_projection=method == "prefix")
        )
    elif method == "peft_prefix":
        from peft import PrefixTuningConfig, get_peft_model

        if checkpointing:
            enable_checkpointing(model)  # before wrapping, as a user would: PEFT then refuses
        model = get_peft_model(
            model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PRE_SEQ_LEN)
        )
        return model
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=LORA_TARGETS))
    elif method == "full":
        if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
            raise ValueError("quantised weights cannot be trained")
        model.requires_grad_(True)
    elif method == "limit":
        model.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(model)
    return model


def training_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Forward, backward, AdamW step over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def limit_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Forward and backward to the input embeddings of the frozen model: nothing to update."""
    embed = model.get_input_embeddings()

    def step() -> None:
        embeds = embed(batch["input_ids"]).detach().requires_grad_()
        model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        ).loss.backward()

    return step


def build_contender(model_dir: str, method: str, setting: Setting) -> tuple[Callable[[], None], nn.Module]:
    model = apply_method(load_backbone(model_dir, setting.backbone), method, setting.checkpointing)
    model.train()
    batch = make_batch(model.config.vocab_size, setting.batch_size, setting.seq_len)
    step = limit_step(model, batch) if method == "limit" else training_step(model, batch)
    return step, model


def refusal(error: Exception) -> str:
    return f"refused: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


# ------------------------------------------------------------------------------------------------- throughput
def measure_setting(
    setting: Setting, methods: tuple[str, ...], plan: Plan, model_dir: str
) -> list[dict[str, Any]]:
    """Build every contender of one setting, then time them in alternating rounds."""
    steps: dict[str, Callable[[], None]] = {}
    rows: list[dict[str, Any]] = []
    models = []
    for method in methods:
        try:
            step, model = build_contender(model_dir, method, setting)
            step()  # the first step surfaces a refusal at the forward (e.g. PEFT under checkpointing)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
            rows.append({**asdict(setting), "method": method, "status": refusal(error)})
            continue
        steps[method], _ = step, models.append(model)
    rounds = alternate(steps, plan.repeats, plan.warmup, plan.calls)
    tokens = setting.batch_size * setting.seq_len
    for method, seconds in rounds.items():
        step_s = summary(seconds)
        rows.append(
            {
                **asdict(setting),
                "method": method,
                "status": "ok",
                "step_s": step_s,
                "tokens_per_s": summary(tokens / s for s in seconds),
            }
        )
    del models, steps
    release_freed_memory()
    return rows


def throughput(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_wide_model_") as wide_dir:
        if any(s.model == "wide" for s in plan.throughput_settings):
            save_random_model(WIDE, Path(wide_dir))
        model_dirs = {"tiny": str(ROOT / TINY_MODEL), "wide": wide_dir}
        for setting in plan.throughput_settings:
            start = time.perf_counter()
            rows += measure_setting(setting, plan.methods, plan, model_dirs[setting.model])
            print(
                f"# throughput {setting.label()}: {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------------------------------- memory
def save_random_model(config_kwargs: dict[str, Any], directory: Path) -> int:
    """A randomly initialised GLM saved with from_pretrained's layout (the quantised loaders need a directory)."""
    torch.manual_seed(0)
    config = GlmConfig(
        **config_kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=2048
    )
    model = GlmForCausalLM(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def warm_up(setting: Setting, method: str) -> None:
    """Run the same code path once on the tiny model and free it: what that leaves behind (lazily imported
    modules, kernel and thread-pool state) is the process's runtime, not the training's memory."""
    step, model = build_contender(str(ROOT / TINY_MODEL), method, replace(setting, seq_len=32))
    step()
    del step, model
    release_freed_memory()


def touch_weights(model: nn.Module) -> None:
    # Weights loaded from safetensors may be memory-mapped and read lazily: make them resident before the
    # "before the first forward" reading, so that the forward's first touch does not count as activations.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """One memory configuration, run in this (fresh) process: memory before the first forward, peak, step time."""
    setting = Setting(spec["backbone"], spec["seq_len"], spec["batch_size"], spec["checkpointing"])
    try:
        warm_up(setting, spec["method"])
        runtime = current_memory()
        step, model = build_contender(spec["model_dir"], spec["method"], setting)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
        return {**spec, "status": refusal(error)}
    touch_weights(model)
    release_freed_memory()
    before = current_memory()
    reset_peak_memory()
    seconds = [seconds_per_call(step) for _ in range(spec["steps"])]
    peak = peak_memory()
    mib = 2**20
    return {
        **spec,
        "status": "ok",
        "runtime_mib": runtime / mib,
        "before_first_forward_mib": before / mib,
        "peak_mib": peak / mib,
        "model_mib": (before - runtime) / mib,
        "activation_mib": (peak - before) / mib,
        "training_mib": (peak - runtime) / mib,
        "step_s": seconds,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """``probe`` in a fresh interpreter; its last stdout line is the result."""
    command = [sys.executable, "-m", "benchmarks.train", "--probe", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {**spec, "status": f"failed (exit {done.returncode}): {tail[0][:160]}"}
    return json.loads(lines[-1])


def memory(plan: Plan) -> tuple[list[dict[str, Any]], int]:
    with tempfile.TemporaryDirectory(prefix="bench_memory_model_") as directory:
        n_params = save_random_model(plan.memory_config, Path(directory))
        release_freed_memory()
        rows = []
        for spec in plan.memory_probes:
            start = time.perf_counter()
            full_spec = {**spec, "model_dir": directory, "batch_size": 1}
            rows.append(run_probe(full_spec))
            label = f"{spec['method']} {spec['backbone']} seq {spec['seq_len']} ckpt {spec['checkpointing']}"
            print(f"# memory {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    for row in rows:
        row.pop("model_dir", None)
    return rows, n_params


# ---------------------------------------------------------------------------------------------------- profile
def profile_ops(setting: Setting, methods: tuple[str, ...], steps: int, top: int = 12) -> dict[str, Any]:
    """Self CPU time per operator and method (ms per step), the methods' steps profiled in alternation."""
    from torch.profiler import ProfilerActivity, profile

    contenders = {m: build_contender(str(ROOT / TINY_MODEL), m, setting) for m in methods}
    for step, _ in contenders.values():
        step()
        step()
    totals: dict[str, dict[str, float]] = {m: {} for m in methods}
    for _ in range(steps):
        for method, (step, _) in contenders.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for event in prof.key_averages():
                ops = totals[method]
                ops[event.key] = ops.get(event.key, 0.0) + event.self_cpu_time_total / 1000 / steps
    pt2, limit = totals["pt2"], totals["limit"]
    deltas = sorted(
        ((name, pt2.get(name, 0.0), limit.get(name, 0.0)) for name in set(pt2) | set(limit)),
        key=lambda item: -(item[1] - item[2]),
    )
    return {
        "setting": asdict(setting),
        "steps": steps,
        "ops": totals,
        "pt2_minus_limit": [{"op": n, "pt2_ms": a, "limit_ms": b} for n, a, b in deltas[:top]],
        "pt2_total_ms": sum(pt2.values()),
        "limit_total_ms": sum(limit.values()),
        "pt2_hook_ms": hook_ms(contenders["pt2"][1], setting),
    }


def profile(plan: Plan) -> dict[str, Any]:
    """Operator profile at the first setting; the ablation on glm-zh-tiny without checkpointing in fp32 (each
    length) and bf16 (the first length)."""
    first = plan.throughput_settings[0]
    ablations = {}
    for setting in plan.throughput_settings:
        if setting.model != "tiny" or setting.checkpointing:
            continue
        if setting.backbone == "fp32" or (setting.backbone == "bf16" and setting.seq_len == first.seq_len):
            ablations[setting.label()] = ablation(setting, plan.repeats, plan.calls)
    return {"ops": profile_ops(first, ("pt2", "limit"), plan.profile_steps), "ablation": ablations}


ABLATIONS = {
    "limit": "the limit",
    "limit_masked": "the limit given an explicit causal mask (the masked attention path a prefix needs)",
    "pt2": "P-Tuning v2, 128 tokens",
    "pt2_frozen": "the same prefix, frozen (attention over 128 more keys, no prefix update)",
    "pt2_p1": "P-Tuning v2, 1 token (the mechanism: hook, cache, mask, positions, optimizer)",
    "pt2_no_dropout": "P-Tuning v2, 128 tokens, no prefix dropout",
}


def ablation_contender(variant: str, setting: Setting) -> Callable[[], None]:
    """Variants of P-Tuning v2 that each remove one cost, to split its time over the limit into causes."""
    if variant == "limit":
        return build_contender(str(ROOT / TINY_MODEL), "limit", setting)[0]
    if variant == "limit_masked":
        # A prefix makes transformers pass sdpa an explicit mask (prefix columns + causal) instead of
        # is_causal=True: no skipping of the masked half, and GQA keys repeated per head. A 4-D causal mask takes
        # the limit down the same path with the same result.
        model = apply_method(
            load_backbone(str(ROOT / TINY_MODEL), setting.backbone), "limit", setting.checkpointing
        )
        model.train()
        batch = make_batch(model.config.vocab_size, setting.batch_size, setting.seq_len)
        causal = torch.ones(setting.seq_len, setting.seq_len, dtype=torch.bool, device=device()).tril()
        batch["attention_mask"] = causal[None, None].expand(setting.batch_size, 1, -1, -1)
        return limit_step(model, batch)
    config = PrefixConfig(
        pre_seq_len=1 if variant == "pt2_p1" else PRE_SEQ_LEN,
        prefix_dropout=0.0 if variant == "pt2_no_dropout" else 0.1,
    )
    model = attach_prefix(load_backbone(str(ROOT / TINY_MODEL), setting.backbone), config)
    if setting.checkpointing:
        enable_checkpointing(model)
    model.train()
    batch = make_batch(model.config.vocab_size, setting.batch_size, setting.seq_len)
    if variant == "pt2_frozen":
        model.requires_grad_(False)
        return limit_step(model, batch)  # backward to the embeddings, through the prefixed attention
    return training_step(model, batch)


def ablation(setting: Setting, repeats: int, calls: int) -> dict[str, dict[str, float]]:
    """Step time of each variant (median, min-max over alternating rounds)."""
    steps = {variant: ablation_contender(variant, setting) for variant in ABLATIONS}
    rounds = alternate(steps, repeats, warmup=2, calls=calls)
    return {variant: summary(1000 * s for s in seconds) for variant, seconds in rounds.items()}


def hook_ms(model: nn.Module, setting: Setting, calls: int = 20) -> float:
    """Milliseconds the prefix pre-hook spends per training forward (prefix encoder, cache, mask, positions)."""
    hooks = list(model._forward_pre_hooks.values())
    batch = make_batch(model.config.vocab_size, setting.batch_size, setting.seq_len)
    kwargs = {**batch, "use_cache": False}
    seconds = [seconds_per_call(lambda: [h(model, (), dict(kwargs)) for h in hooks]) for _ in range(calls)]
    return 1000 * sorted(seconds)[len(seconds) // 2]


# ---------------------------------------------------------------------------------------------------- summary
def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and row.get("status") == "ok":
            return row
    return None


def median_of(row: dict[str, Any] | None, key: str) -> float | None:
    return row[key]["median"] if row else None


def headline(
    rows: list[dict[str, Any]], mem: list[dict[str, Any]], setting: Setting
) -> dict[str, float | None]:
    """The issue's ratios, from the first throughput setting (fp32, shortest sequence, no checkpointing)."""
    where = setting.where()
    tps = {m: median_of(find(rows, method=m, **where), "tokens_per_s") for m in METHODS}
    step = {m: median_of(find(rows, method=m, **where), "step_s") for m in METHODS}
    short_len = min((p["seq_len"] for p in mem), default=0)
    long_len = max((p["seq_len"] for p in mem), default=0)
    pt2 = {
        b: find(mem, method="pt2", backbone=b, seq_len=short_len, checkpointing=False) for b in COMPUTE_DTYPE
    }
    no_ckpt = find(mem, method="pt2", backbone="fp32", seq_len=long_len, checkpointing=False)
    ckpt = find(mem, method="pt2", backbone="fp32", seq_len=long_len, checkpointing=True)

    def mem_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
        return ratio(a and a[key], b and b[key])

    return {
        "pt2_vs_peft_tokens_per_s": ratio(tps["pt2"], tps["peft_prefix"]),
        "pt2_vs_full_tokens_per_s": ratio(tps["pt2"], tps["full"]),
        "pt2_vs_limit_step_time": ratio(step["pt2"], step["limit"]),
        "int4_vs_fp32_peak_mem": mem_ratio(pt2["int4"], pt2["fp32"], "training_mib"),
        # The same comparison counted other ways: the whole process's peak, and the weights alone.
        "int4_vs_fp32_peak_rss": mem_ratio(pt2["int4"], pt2["fp32"], "peak_mib"),
        "int4_vs_fp32_weights_mem": mem_ratio(pt2["int4"], pt2["fp32"], "model_mib"),
        "int4_bf16_vs_fp32_peak_mem": mem_ratio(pt2["int4-bf16"], pt2["fp32"], "training_mib"),
        "ckpt_vs_no_ckpt_activation_mem": mem_ratio(ckpt, no_ckpt, "activation_mib"),
    }


# --------------------------------------------------------------------------------------------------- markdown
def _cell(row: dict[str, Any] | None, key: str, fmt: str = "{:.0f}") -> str:
    if row is None:
        return "n/a"
    if row["status"] != "ok":
        return row["status"]
    stats = row[key]
    return f"{fmt.format(stats['median'])} ({fmt.format(stats['min'])}-{fmt.format(stats['max'])})"


def throughput_table(
    rows: list[dict[str, Any]], settings: tuple[Setting, ...], methods: tuple[str, ...]
) -> list[str]:
    """One row per setting: each contender's tokens/s, then P-Tuning v2's ratios to the peers and to the limit."""
    header = (
        "| setting | " + " | ".join(METHODS[m] for m in methods) + " | pt2/PEFT | pt2/full | pt2 step/limit |"
    )
    table = [header, "|---|" + "---:|" * (len(methods) + 3)]
    for s in settings:
        where = s.where()
        cells = [
            _cell(next((r for r in rows if r["method"] == m and _matches(r, where)), None), "tokens_per_s")
            for m in methods
        ]
        tps = {m: median_of(find(rows, method=m, **where), "tokens_per_s") for m in methods}
        step = {m: median_of(find(rows, method=m, **where), "step_s") for m in methods}
        ratios = [
            ratio(tps.get("pt2"), tps.get("peft_prefix")),
            ratio(tps.get("pt2"), tps.get("full")),
            ratio(step.get("pt2"), step.get("limit")),
        ]
        shown = ["n/a" if r is None else f"{r:.2f}" for r in ratios]
        table.append(f"| {s.label()} | " + " | ".join(cells + shown) + " |")
    return table


def _matches(row: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in where.items())


def memory_table(mem: list[dict[str, Any]], n_params: int) -> list[str]:
    table = [
        "| method | backbone | seq | ckpt | before 1st forward (MiB) | peak RSS (MiB) | training memory (MiB) | "
        "activation memory (MiB) | step time (s) |",
        "|---|---|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for row in mem:
        lead = f"| {METHODS[row['method']]} | {row['backbone']} | {row['seq_len']} | {'yes' if row['checkpointing'] else 'no'} |"
        if row["status"] != "ok":
            table.append(f"{lead} {row['status']} | | | | |")
            continue
        steps = ", ".join(f"{s:.1f}" for s in row["step_s"])
        table.append(
            f"{lead} {row['before_first_forward_mib']:.0f} | {row['peak_mib']:.0f} | {row['training_mib']:.0f} | "
            f"{row['activation_mib']:.0f} | {steps} |"
        )
    table.append("")
    table.append(
        f"Random GLM of {n_params / 1e6:.0f}M parameters, batch 1, one fresh process per row (its runtime after the "
        "imports is about "
        f"{min((r['runtime_mib'] for r in mem if r['status'] == 'ok'), default=0):.0f} MiB). Training memory = peak "
        "minus the process after its imports; activation memory = peak minus just before the first forward "
        "(includes gradients and the optimizer state created in the first step)."
    )
    return table


def ablation_table(ablations: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Step time of P-Tuning v2 variants that each drop one cost, against the limit."""
    settings = list(ablations)
    lines = [
        "Step time of variants that each remove one cost (ms per step, median and min-max of alternating rounds; "
        "in brackets: over the limit):",
        "",
        "| variant | " + " | ".join(settings) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    for variant, label in ABLATIONS.items():
        cells = []
        for setting in settings:
            row, limit = ablations[setting][variant], ablations[setting]["limit"]["median"]
            cells.append(
                f"{row['median']:.1f} ({row['min']:.1f}-{row['max']:.1f}) [{row['median'] / limit:.2f}x]"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def profile_table(ops: dict[str, Any]) -> list[str]:
    s = Setting(**ops["setting"])
    lines = [
        f"torch.profiler, {s.label()}, {ops['steps']} steps each, profiled in alternation; self CPU time per step: "
        f"P-Tuning v2 {ops['pt2_total_ms']:.1f} ms, limit {ops['limit_total_ms']:.1f} ms. The prefix pre-hook alone "
        f"(prefix encoder, cache, mask, positions; forward only) takes {ops['pt2_hook_ms']:.2f} ms per step. "
        "The operators that cost P-Tuning v2 the most over the limit:",
        "",
        "| operator | P-Tuning v2 (ms/step) | limit (ms/step) | difference |",
        "|---|---:|---:|---:|",
    ]
    for item in ops["pt2_minus_limit"]:
        lines.append(
            f"| `{item['op']}` | {item['pt2_ms']:.2f} | {item['limit_ms']:.2f} | "
            f"{item['pt2_ms'] - item['limit_ms']:+.2f} |"
        )
    return lines


def int4_kernel_lines(rows: list[dict[str, Any]], settings: tuple[Setting, ...]) -> list[str]:
    """What the int4 path costs in training, with or without bitsandbytes' hub kernel."""
    has_kernels = importlib.util.find_spec("kernels") is not None
    lines = [
        f"`kernels` package importable: {'yes' if has_kernels else 'no'}. bitsandbytes uses that hub kernel only "
        "for its packed 4-bit CPU path (`gemv_4bit`), which runs in inference (eval mode, no input gradient); "
        "training always takes the generic path (dequantise the weight, then a dense matmul).",
        "",
        "| setting | P-Tuning v2 step int4 / fp32 | int4 / bf16 | limit step int4 / fp32 |",
        "|---|---:|---:|---:|",
    ]
    for s in settings:
        if s.backbone != "int4":
            continue
        where = {"seq_len": s.seq_len, "checkpointing": s.checkpointing}
        cells = []
        for method, base in (("pt2", "fp32"), ("pt2", "bf16"), ("limit", "fp32")):
            value = ratio(
                median_of(find(rows, method=method, backbone="int4", **where), "step_s"),
                median_of(find(rows, method=method, backbone=base, **where), "step_s"),
            )
            cells.append("n/a" if value is None else f"{value:.2f}")
        lines.append(
            f"| seq {s.seq_len}, {'ckpt' if s.checkpointing else 'no ckpt'} | " + " | ".join(cells) + " |"
        )
    return lines


def plot_bars(rows: list[dict[str, Any]], seq_len: int) -> list[dict[str, Any]]:
    colors = {"fp32": "tab:blue", "bf16": "tab:orange", "int8": "tab:purple", "int4": "tab:green"}
    bars = []
    for row in rows:
        if (
            row["status"] == "ok"
            and row["seq_len"] == seq_len
            and not row["checkpointing"]
            and row["model"] == "tiny"
        ):
            stats = row["tokens_per_s"]
            bars.append(
                {
                    "label": f"{row['backbone']} {METHODS[row['method']]}",
                    "color": colors[row["backbone"]],
                    **stats,
                }
            )
    return bars


def markdown(
    rows: list[dict[str, Any]],
    mem: list[dict[str, Any]],
    n_params: int,
    prof: dict[str, Any] | None,
    plan: Plan,
    seconds: float,
) -> str:
    parts = [
        "## Training",
        "",
        f"`python -m benchmarks.train` on {machine()}; {versions()}; {code_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; "
        f"{seconds / 60:.1f} min. The CPU was shared with other work while this ran: absolute figures are noisy, "
        "the ratios less so (contenders alternate within each round).",
        "",
        f"### Throughput: training tokens/s on `{TINY_MODEL}` (median of {plan.repeats} rounds of {plan.calls} steps, "
        "min-max)",
        "",
        f"{PRE_SEQ_LEN}-token prefixes; LoRA on {', '.join(LORA_TARGETS)}; AdamW; every contender of a row has the "
        "same batch of random tokens, loss on every token. int8 = LLM.int8 (fp32 elsewhere); int4 = nf4 with fp32 "
        "compute (the CPU default of `--quantization_bit 4` on CPUs without AVX512-BF16/AMX; with them it is bf16, the "
        "int4-bf16 memory row). 'ckpt' = activation checkpointing, non-reentrant.",
        "",
        *throughput_table(rows, plan.throughput_settings, plan.methods),
        "",
        "### Memory",
        "",
        *memory_table(mem, n_params),
        "",
    ]
    if prof is not None:
        parts += [
            "### Where P-Tuning v2's time goes (profile)",
            "",
            *ablation_table(prof["ablation"]),
            "",
            *profile_table(prof["ops"]),
            "",
        ]
    parts += [
        "### int4 on this CPU: bitsandbytes' kernel",
        "",
        *int4_kernel_lines(rows, plan.throughput_settings),
        "",
    ]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few contenders, 1 round, writes nothing"
    )
    parser.add_argument("--tiny", action="store_true", help="with --quick: the smallest settings (the test)")
    parser.add_argument("--parts", nargs="+", default=["throughput", "memory", "profile"])
    parser.add_argument("--backbones", nargs="+", default=None, help="throughput: only these backbones")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory configuration, as JSON
    return parser.parse_args()


def main() -> None:
    run_with_passive_openmp("benchmarks.train")
    args = parse_args()
    quiet()
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))), flush=True)
        return
    plan = (TINY_PLAN if args.tiny else QUICK_PLAN) if args.quick else FULL_PLAN
    if args.backbones:
        kept = tuple(s for s in plan.throughput_settings if s.backbone in args.backbones)
        plan = replace(plan, throughput_settings=kept)
    start = time.perf_counter()
    rows = throughput(plan) if "throughput" in args.parts else []
    mem, n_params = memory(plan) if "memory" in args.parts else ([], 0)
    prof = None
    if "profile" in args.parts and plan.profile_steps:
        prof = profile(plan)
    ratios = headline(rows, mem, plan.throughput_settings[0])
    if not args.quick:
        text = markdown(rows, mem, n_params, prof, plan, time.perf_counter() - start)
        raw = {
            "throughput": rows,
            "memory": mem,
            "memory_model_parameters": n_params,
            "profile": prof,
            "plot_bars": plot_bars(rows, plan.throughput_settings[0].seq_len),
            "plot_title": f"{TINY_MODEL}, batch {plan.throughput_settings[0].batch_size} x "
            f"{plan.throughput_settings[0].seq_len}, no checkpointing",
        }
        write_section("train", text, raw, ratios)
    print_json_line(ratios)


if __name__ == "__main__":
    main()
