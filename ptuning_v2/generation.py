"""Batched, left-padded generation over a dataset, and the evaluation built on it.

THUDM's evaluation ran at batch size 1; here examples are sorted by length and generated in batches, which gives the
same greedy tokens (the prefix positions ignore left padding) many times faster. The prefix key/values are computed
once per batch, in the first decoding step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .files import atomic_open
from .metrics import all_metrics

# ChatGLM3-style models end an answer with a role token instead of eos.
_STOP_TOKENS = ("<|user|>", "<|observation|>", "<|endoftext|>")


@dataclass
class GenerationSettings:
    """How answers are generated: declared here once for training, evaluation, chat and serving.

    Greedy by default (deterministic); ``do_sample`` with the official top_p 0.7 / temperature 0.95. Field names are
    the flags of ``ptuning_v2.train``, ``ptuning_v2.evaluate`` and ``ptuning_v2.chat``.
    """

    max_new_tokens: int = field(default=128, metadata={"help": "the longest answer, in tokens"})
    do_sample: bool = field(
        default=False, metadata={"help": "sample (official top_p 0.7, temperature 0.95); default greedy"}
    )
    top_p: float = field(default=0.7, metadata={"help": "nucleus sampling mass, when sampling"})
    temperature: float = field(default=0.95, metadata={"help": "sampling temperature, when sampling"})
    num_beams: int = field(default=1, metadata={"help": "beam search width (1: none)"})


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _STOP_TOKENS if t in vocab and vocab[t] not in ids]
    return ids


def generate_kwargs(settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """``model.generate`` arguments for these settings; sampling knobs only when sampling."""
    stops = stop_token_ids(tokenizer)
    return {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "top_p": settings.top_p if settings.do_sample else None,
        "temperature": settings.temperature if settings.do_sample else None,
        "top_k": None,
        "num_beams": settings.num_beams,
        "eos_token_id": stops,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
    }


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (longest first), so padding and wasted compute stay small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    settings: GenerationSettings,
    progress: bool = True,
    batch_size: int = 16,
    seed: int = 42,
) -> tuple[list[str], dict[str, float]]:
    """Generate one answer per tokenized prompt; returns the decoded answers (input order) and speed figures.

    ``seed`` makes sampled answers reproducible; ``batch_size`` prompts of similar length go together."""
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    kwargs = generate_kwargs(settings, tokenizer)
    dropped = torch.tensor([*kwargs["eos_token_id"], kwargs["pad_token_id"]])
    if settings.do_sample:
        torch.manual_seed(seed)
    answers: list[str] = [""] * len(prompts)
    new_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress)
    for batch in _batches([len(p) for p in prompts], batch_size):
        padded = tokenizer.pad(
            {"input_ids": [prompts[i] for i in batch]}, padding_side="left", return_tensors="pt"
        ).to(device)
        width = padded["input_ids"].shape[1]
        output = model.generate(**padded, **kwargs)[:, width:].cpu()
        for row, index in enumerate(batch):
            generated = output[row]
            kept = generated[~torch.isin(generated, dropped)]
            new_tokens += int(kept.numel())
            answers[index] = tokenizer.decode(kept, skip_special_tokens=True).strip()
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.update(len(batch))
        bar.set_postfix({"ex/s": f"{bar.n / elapsed:.2f}", "tok/s": f"{new_tokens / elapsed:.1f}"})
    bar.close()
    model.train(was_training)
    seconds = time.perf_counter() - start
    speed = {
        "examples": len(prompts),
        "seconds": round(seconds, 3),
        "examples_per_second": round(len(prompts) / max(seconds, 1e-9), 3),
        "new_tokens_per_second": round(new_tokens / max(seconds, 1e-9), 2),
    }
    return answers, speed


def write_predictions(path: str | Path, predictions: list[str], labels: list[str]) -> Path:
    """The official ``generated_predictions.txt``: JSON lines ``{"labels", "predict"}``, written atomically."""
    with atomic_open(path) as f:
        for label, predict in zip(labels, predictions):
            f.write(json.dumps({"labels": label, "predict": predict}, ensure_ascii=False) + "\n")
    return Path(path)


def evaluate_dataset(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    settings: GenerationSettings,
    output_file: str | Path | None = None,
    task: str | None = "auto",
    progress: bool = True,
    batch_size: int = 16,
    seed: int = 42,
) -> dict[str, Any]:
    """Generate for a ``tokenize_for_generation`` dataset, write the predictions file, and score it."""
    prompts = [list(ids) for ids in dataset["input_ids"]]
    labels = list(dataset["label_text"])
    predictions, speed = generate_texts(
        model, tokenizer, prompts, settings, progress=progress, batch_size=batch_size, seed=seed
    )
    if output_file is not None:
        write_predictions(output_file, predictions, labels)
    metrics = all_metrics(predictions, labels, task=task)
    return {**metrics, "speed": speed}
