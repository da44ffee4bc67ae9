"""One way in: every entry point (train, evaluate, chat) loads its model and tokenizer here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from .checkpoint import CheckpointRecord
from .methods import attach_method, load_method, method_spec, read_checkpoint
from .quantization import compute_dtype_note, cpu_compute_dtype, prepare_4bit_for_cpu
from .spellings import canonical_dtype, dtype_choices, parse_quantization

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by canonical_dtype's names


def resolve_dtype(
    torch_dtype: str | torch.dtype | None, quantization_bit: int | str | None = None
) -> torch.dtype:
    """None means bf16 on a GPU that has it (else fp16); on CPU fp32, except a quantised backbone on a CPU that
    computes bf16 natively (AVX512-BF16/AMX): bf16 there (``cpu_compute_dtype``)."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype is None or torch_dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if torch.cuda.is_available():
            return torch.float16
        return _DTYPES[cpu_compute_dtype(parse_quantization(quantization_bit) is not None)]
    name = canonical_dtype(str(torch_dtype))
    if name is None:
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; use one of {sorted(dtype_choices())}")
    return _DTYPES[name]


def quantization_config(quantization_bit: int | str | None, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for a frozen backbone: nf4 for 4-bit, LLM.int8 for 8-bit."""
    bits = parse_quantization(quantization_bit)
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _device_map() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def check_model_path(model_name_or_path: str) -> None:
    """Fail with the path's name when a local model directory is missing, not later as a malformed Hub repo id.

    A name that can only be a path (absolute, ``./``/``~``, or with more than one ``/``) must exist; so must any
    name under ``HF_HUB_OFFLINE=1``. A bare Hub id (``org/name``) is left to the Hub when online.
    """
    path = Path(model_name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model {model_name_or_path!r} is a file, not a model directory")
        return
    name = str(model_name_or_path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {name!r} is not a local directory (and HF_HUB_OFFLINE=1)")


def _is_chatglm(path: str) -> bool:
    if not Path(path).is_dir():
        return False
    from .chatglm import is_chatglm_checkpoint

    return is_chatglm_checkpoint(path)


def load_model(
    model_name_or_path: str,
    ptuning_checkpoint: str | CheckpointRecord | None = None,
    quantization_bit: int | str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    *,
    model_class: Any = AutoModelForCausalLM,
    **model_kwargs: Any,
) -> nn.Module:
    """Load a (frozen) backbone, optionally quantised, with the method of ``ptuning_checkpoint`` attached.

    ``model_name_or_path`` may be a transformers-native directory or a THUDM original-layout ChatGLM2/3 directory
    (converted in memory to the native ``glm`` model). ``ptuning_checkpoint`` may be any method's checkpoint
    (prefixes also in THUDM's official and PEFT's formats); a full fine-tuning checkpoint is a whole model and
    replaces the backbone.
    """
    check_model_path(model_name_or_path)
    record = ptuning_checkpoint or None
    if isinstance(record, (str, os.PathLike)):
        record = read_checkpoint(record)
    whole_model = record is not None and method_spec(record.method).saves_backbone
    if whole_model:
        if quantization_config(quantization_bit, torch.float32) is not None:
            raise ValueError(
                f"{record.path} is a full fine-tuning checkpoint: load it unquantized (quantization_bit "
                f"{quantization_bit} would quantize the fine-tuned weights it holds)"
            )
        model_name_or_path = str(record.path)
    dtype = resolve_dtype(torch_dtype, quantization_bit)
    quant = quantization_config(quantization_bit, dtype)
    if quant is not None and torch_dtype in (None, "auto") and not torch.cuda.is_available():
        print(f"note: {compute_dtype_note()}", file=sys.stderr, flush=True)
    if _is_chatglm(model_name_or_path):
        from .chatglm import load_chatglm_as_glm

        model, _ = load_chatglm_as_glm(model_name_or_path, torch_dtype=dtype, quantization_config=quant)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, **model_kwargs}
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map=_device_map())
        model = model_class.from_pretrained(model_name_or_path, **kwargs)
        if quant is not None:
            prepare_4bit_for_cpu(model)  # layers bitsandbytes' AVX512-BF16 CPU kernel cannot take
    model.requires_grad_(False)
    if whole_model:
        attach_method(model, record.method)
    elif record is not None:
        load_method(model, record)
    model.eval()
    return model


def load_tokenizer(model_name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, left-padded for batched generation; ChatGLM2/3 originals without remote code."""
    check_model_path(model_name_or_path)
    if _is_chatglm(model_name_or_path) and (Path(model_name_or_path) / "tokenizer.model").is_file():
        from .tokenization import build_chatglm_tokenizer

        tokenizer = build_chatglm_tokenizer(str(Path(model_name_or_path) / "tokenizer.model"))
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
