"""Memory planner: the expected peak memory of one training process, worked out from the model's config alone.

    python -m ptuning_v2.plan --model glm-4-9b-chat-hf --pre_seq_len 128 --quantization_bit 4 \\
        --per_device_train_batch_size 1 --max_source_length 256 --max_target_length 256

Nothing is loaded or downloaded: the plan is arithmetic on the config (a shipped name, a config.json, or a model
directory) and the training settings, under the same flag names as ``python -m ptuning_v2.train``. From Python::

    plan = plan_memory(config, PlanSettings(method="ptuning_v2", pre_seq_len=128, quantization_bit=4))
    plan.total_bytes, print(plan.describe())

The peak has four parts.

**Weights** (the frozen backbone). Unquantised: every parameter in the compute dtype. ``--quantization_bit 4``
(bitsandbytes nf4, as ``loading.py`` asks for it: blocksize 64, no double quantisation) stores the decoder layers'
linear weights at 0.5 B/param plus one fp32 absmax per 64 weights (0.5625 B/param); ``8`` (LLM.int8) at 1 B/param
plus one fp32 scale per output row. Embeddings, norms, biases and the output head stay in the compute dtype, as
bitsandbytes leaves them. ZeRO-3 shards unquantised weights over the GPUs (bitsandbytes weights are counted whole).

**Trainable state** (16 B per trained parameter). The prefix and prompt encoders and PEFT's LoRA adapters are
fp32 whatever the backbone: 4 (weight) + 4 (gradient) + 8 (AdamW's two moments). Full fine-tuning in 16 bits is
counted as mixed precision: 2 (weight) + 2 (gradient) + 4 (fp32 master) + 8 (moments); ZeRO keeps an fp32 master
of its partition in any case. ZeRO stage 1 shards master and moments over ``--num_gpus``, stage 2 also the
gradients, stage 3 also the weights. The Trainer's default optimiser is fused AdamW, which needs no per-step
scratch. The optimiser state exists from the first step on, so the plan is for the second step and later.

**Activations**: the tensors autograd saves for backward, counted from what a transformers ``GlmForCausalLM``
(which ChatGLM2/3 originals are converted to) saves with SDPA attention; per decoder layer, with ``T = B·S``
tokens, ``S_kv = S + P`` key/value positions (a prefix adds its P keys/values to every layer), ``b`` bytes of the
compute dtype, ``h`` hidden size, ``H``/``K`` query/key-value heads of width ``d``, ``I`` MLP width:

    2 RMSNorms                2 · (T·h·4 + T·4)  (their fp32 input, upcast from the residual stream; rsqrt)
    RoPE (GLM)                2 · B·S·(d/2)·b    (cos/sin, re-interleaved in every layer)
    SDPA inputs and output    T·H·d·b (q) + 2 · B·H'·S_kv·d·b (k, v) + T·H·d·b (out) + B·H·S·4 (logsumexp)
    SDPA mask                 B·S·S_kv·b         (the boolean mask, converted to the compute dtype per call)
    gated MLP                 3 · T·I·b          (gate_up output, kept whole by silu's saved view, and silu(gate))

``H' = K`` when there is no mask (transformers then lets SDPA broadcast the key/value groups), else the keys and
values are repeated to ``H`` heads first. The mask exists with a prefix (its keys make ``S_kv > S``) or padding,
which the plan assumes for batches of more than one example. Eager attention instead saves the probabilities,
``B·H·S·S_kv·4`` (fp32 softmax) plus their ``b``-byte copy when ``b < 4``, and keeps neither the mask nor the
output. With a prefix, the first layer's input does not need a gradient, so its first norm and RoPE save nothing.
LoRA adds what each adapted layer's ``lora_A`` saves: the layer input (an fp32 copy per adapter when the backbone
is 16-bit; with ``lora_dropout`` a dropout output and mask per adapter) and ``T·r·4``. Full fine-tuning adds every
linear layer's input and each norm's normalised output. P-Tuning v1 and Prompt Tuning add P virtual tokens to
the sequence (``S -> S + P`` everywhere, the loss included) and no prefix. Outside the layers: the final norm
(``T·h·4``), the loss's fp32 log-softmax (``T·V·4``) and the prefix dropout's mask (``B·P·kv_size``, 4 bytes per
value on CPU where dropout saves a float mask, 1 on CUDA).

With ``--gradient_checkpointing`` each layer keeps only its input, ``T·h·b``, and one layer's activations are
recomputed at a time in the backward pass.

**Workspace**: what lives only for a moment at the peak. The loss: ``logits`` ``T·V`` in the compute dtype and
their fp32 copy in the forward pass, then two fp32 ``T·V`` gradients on top of the saved log-softmax at the start
of the backward pass. A layer's backward pass: the larger of ``4·T·I·b`` in the MLP and the attention's input
gradients (eager: two fp32 ``B·H·S·S_kv`` score gradients); with checkpointing, also the layer's recomputed
activations. bitsandbytes dequantises each weight to the compute dtype for its matmul (the largest one counts),
and ZeRO-3 gathers one layer's weights.

The peak is the largest of three moments: the start of the backward pass (all activations plus the larger of the
loss's and one layer's workspace), the end of the backward pass (all gradients plus one layer's workspace: the
first layer's activations are gone by the time the embeddings' gradients exist) and the optimiser step (all
gradients). The split printed is that moment's. For the methods that train few parameters it is always the start
of the backward pass; full fine-tuning can peak at its end.

Every example is taken at full length (``--seq_len``, or max_source_length + max_target_length + 1 as
``ptuning_v2.data`` caps them): the collator pads a batch to its longest example, so shorter batches need less.
Not counted: the CUDA context and libraries (about 0.3-1 GiB per process), the caching allocator's fragmentation
and reserve, DeepSpeed's communication buckets, evaluation and generation, and the first step (no optimiser state
yet, but the same activations). ``benchmarks/plan_validation.py`` measures real peaks on CPU against this plan
(results: ``benchmarks/results/plan_validation.md``).

**THUDM's figure.** ChatGLM-6B's P-Tuning v2 README says its int4 setting (PRE_SEQ_LEN=128, batch 1,
max_source_length 64 + max_target_length 64, fp16) trains in 7 GB of GPU memory. The plan for it
(``--model chatglm-6b --pre_seq_len 128 --quantization_bit 4 --torch_dtype fp16 --per_device_train_batch_size 1
--seq_len 128 --device cuda``) is 4.90 GiB (5.26 GB) at the start of the backward pass: weights 3.95 GiB (5.6 B
decoder weights in nf4 with their absmax, the tied 0.53 B-entry embedding in fp16), trainable state 0.33 GiB (the
MHA prefix is 29.4 M values: 0.11 GiB of weights and 0.22 GiB of AdamW moments), activations 0.48 GiB, workspace
0.14 GiB (5.03 GiB with eager attention, as THUDM's own modelling code computes it). Their own int4 kernels keep
fp16 row scales where nf4 keeps fp32 block absmax (0.33 GiB less). The remaining 1.7-2 GB of their 7 GB is what
the plan leaves out and ``nvidia-smi`` shows: the CUDA context and libraries, cuBLAS workspaces and the caching
allocator's reserve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .methods.catalog import CATALOG, DEFAULT_METHOD, KV_PREFIX, VIRTUAL_TOKENS, MethodSpec, chosen_method
from .spellings import SpellingError, canonical_dtype, dtype_choices, parse_bool, parse_quantization

GIB = 1024**3
MODEL_CONFIGS = Path(__file__).with_name("model_configs")

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# bitsandbytes' default nf4 block: one fp32 absmax per 64 weights (loading.py asks for no double quantisation).
NF4_BLOCKSIZE = 64
ADAPTER_BYTES = 4  # prefix/prompt encoders and PEFT's LoRA weights are fp32 whatever the backbone


class PlanError(ValueError):
    """Bad input, with the flag and value at fault in the message; ``exit_code`` 1 for files, 2 for values."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer; ``source`` names the tensor it reads (layers sharing it share it)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    source: str  # "attn_in" (first norm's output), "attn_out", "mlp_in" (second norm's output), "mlp_act"


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a ChatGLM or transformers config."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    gated_mlp: bool = True  # SwiGLU (ChatGLM2/3, GLM-4, Qwen, Llama); the first ChatGLM has a GELU MLP
    fused_gate_up: bool = True  # GLM's gate_up_proj; Llama-style models have gate_proj and up_proj
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm (the first ChatGLM) has a bias; RMSNorm does not
    norms_per_layer: int = 2  # glm4 (GLM-4-0414) adds two post-norms
    rotary_dim: int = 64  # rotated width per head
    rope_per_layer: bool = True  # GLM re-interleaves cos/sin inside every layer, so each layer saves a copy

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Values per prefix token: a key and a value per layer (THUDM's ``kv_size``)."""
        return self.num_layers * 2 * self.kv_dim

    def linear_layers(self, target_modules: str) -> list[Linear]:
        """The linear layers of one decoder layer that ``target_modules`` names (LoRA's ``all-linear`` or names)."""
        return lora_targets(self, target_modules)

    def linears(self) -> list[Linear]:
        h, q, kv, inter = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        attention = [
            Linear("q_proj", h, q, self.qkv_bias, "attn_in"),
            Linear("k_proj", h, kv, self.qkv_bias, "attn_in"),
            Linear("v_proj", h, kv, self.qkv_bias, "attn_in"),
            Linear("o_proj", q, h, self.o_bias, "attn_out"),
        ]
        if not self.gated_mlp:
            mlp = [Linear("up_proj", h, inter, self.mlp_bias, "mlp_in")]
        elif self.fused_gate_up:
            mlp = [Linear("gate_up_proj", h, 2 * inter, self.mlp_bias, "mlp_in")]
        else:
            mlp = [
                Linear("gate_proj", h, inter, self.mlp_bias, "mlp_in"),
                Linear("up_proj", h, inter, self.mlp_bias, "mlp_in"),
            ]
        return attention + mlp + [Linear("down_proj", inter, h, self.mlp_bias, "mlp_act")]

    @property
    def layer_linear_weights(self) -> int:
        """Weight entries of one layer's linear layers: what bitsandbytes quantises."""
        return sum(lin.in_features * lin.out_features for lin in self.linears())

    @property
    def layer_parameters(self) -> int:
        biases = sum(lin.out_features for lin in self.linears() if lin.bias)
        norms = self.norms_per_layer * self.hidden_size * (2 if self.norm_bias else 1)
        return self.layer_linear_weights + biases + norms

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_parameters(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_parameters
        final_norm = self.hidden_size * (2 if self.norm_bias else 1)
        return self.num_layers * self.layer_parameters + self.embedding_parameters + head + final_norm


def _get(config: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return None


def _config_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A plain dict of a config: a dict as it is, a transformers config with its class defaults filled in."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    if hasattr(config, "to_dict"):
        values = config.to_dict()
        # to_dict() leaves out some attributes that are properties or aliases (head_dim on a few classes).
        for name in ("head_dim", "num_key_value_heads", "tie_word_embeddings", "partial_rotary_factor"):
            if values.get(name) is None and getattr(config, name, None) is not None:
                values[name] = getattr(config, name)
        return values
    raise PlanError(f"config must be a dict or a transformers PretrainedConfig, got {type(config).__name__}")


def _required(config: Mapping[str, Any], what: str, *names: str) -> int:
    value = _get(config, *names)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        found = f"{value!r}" if value is not None else "missing"
        raise PlanError(f"config: {what} ({' or '.join(names)}) must be a positive integer, got {found}")
    return value


def model_shape(config: Mapping[str, Any] | Any) -> ModelShape:
    """Read a config in ChatGLM's names (num_layers, multi_query_group_num, kv_channels, ffn_hidden_size,
    padded_vocab_size) or transformers' (num_hidden_layers, num_key_value_heads, head_dim, intermediate_size,
    vocab_size). A ``PretrainedConfig`` or a dict."""
    values = _config_dict(config)
    if isinstance(values.get("text_config"), Mapping):  # multimodal wrappers keep the decoder here
        values = {**values["text_config"], "model_type": values["text_config"].get("model_type", "")}
    model_type = str(values.get("model_type") or "")
    layers = _required(values, "number of layers", "num_layers", "num_hidden_layers", "n_layer")
    hidden = _required(values, "hidden size", "hidden_size", "n_embd", "d_model")
    heads = _required(values, "attention heads", "num_attention_heads", "n_head")
    head_dim = _get(values, "head_dim", "kv_channels") or hidden // heads
    vocab = _required(values, "vocabulary size", "padded_vocab_size", "vocab_size")
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    partial = _get(values, "partial_rotary_factor") or (rope.get("partial_rotary_factor") if rope else None)

    if model_type == "chatglm":
        # THUDM's remote-code configs. ChatGLM2/3 (padded_vocab_size) are SwiGLU + RMSNorm with QKV bias only and
        # an untied output layer; the first ChatGLM is MHA with a GELU MLP, LayerNorm, biases everywhere and
        # lm_head tied to the word embeddings.
        first = values.get("padded_vocab_size") is None and values.get("ffn_hidden_size") is None
        kv_heads = values.get("multi_query_group_num") if values.get("multi_query_attention") else heads
        inter = _get(values, "ffn_hidden_size", "inner_hidden_size") or 4 * hidden
        tie = values.get("tie_word_embeddings", first)
        return ModelShape(
            model_type="chatglm",
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads or heads,
            head_dim=head_dim,
            intermediate_size=inter,
            vocab_size=vocab,
            tie_word_embeddings=bool(tie),
            gated_mlp=not first,
            qkv_bias=bool(values.get("add_qkv_bias", True)),
            o_bias=bool(values.get("add_bias_linear", first)),
            mlp_bias=bool(values.get("add_bias_linear", first)),
            norm_bias=first or not values.get("rmsnorm", True),
            rotary_dim=head_dim // 2,  # ChatGLM rotates half of each head (the first one: 2-D positions)
        )

    kv_heads = _get(values, "num_key_value_heads", "multi_query_group_num", "num_kv_heads") or heads
    if values.get("multi_query") and not values.get("new_decoder_architecture"):
        kv_heads = 1  # Falcon-7B, GPTBigCode
    inter = _get(values, "intermediate_size", "ffn_hidden_size", "n_inner") or 4 * hidden
    is_glm = model_type in ("glm", "glm4")
    if partial is None:
        partial = 0.5 if is_glm else 1.0
    # Class defaults for configs read from a dict: GLM and Qwen2 untie the head, Llama's and most others' tie
    # it (PretrainedConfig's default); Qwen2 has a QKV bias without a flag.
    tie = values.get("tie_word_embeddings", model_type not in ("glm", "glm4", "qwen2", "chatglm"))
    qkv_bias = values.get("attention_bias", is_glm) or model_type == "qwen2" or bool(values.get("qkv_bias"))
    return ModelShape(
        model_type=model_type or "unknown",
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=bool(tie),
        gated_mlp=values.get("hidden_act", "silu") in ("silu", "swiglu", "swish", "gelu_pytorch_tanh")
        and model_type not in ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "gpt_bigcode", "phi"),
        fused_gate_up=is_glm,
        qkv_bias=bool(qkv_bias),
        o_bias=bool(values.get("attention_bias", False)) and not is_glm and model_type != "qwen2",
        mlp_bias=bool(values.get("mlp_bias", False)),
        norms_per_layer=4 if model_type == "glm4" else 2,
        rotary_dim=int(head_dim * partial),
        rope_per_layer=is_glm,
    )


# ---------------------------------------------------------------------------------------------- config lookup


def shipped_models() -> list[str]:
    """Names of the configs in ``ptuning_v2/model_configs`` (``--model chatglm3-6b``)."""
    return sorted(path.stem for path in MODEL_CONFIGS.glob("*.json"))


def _read_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PlanError(
            f"{flag} {str(path)!r}: cannot read it ({err.strerror or err})", exit_code=1
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise PlanError(f"{flag} {str(path)!r}: not valid JSON ({err})", exit_code=1) from None
    if not isinstance(value, dict):
        raise PlanError(
            f"{flag} {str(path)!r}: expected a JSON object, got {type(value).__name__}", exit_code=1
        )
    return value


def load_model_config(model: str) -> dict[str, Any]:
    """The config of ``--model``: a shipped name, a config.json, or a model directory holding one.

    A Hub-style id whose last part is a shipped name (``THUDM/chatglm3-6b``) maps to the shipped config when no
    such local path exists, so the training command's ``--model_name_or_path`` works here as it is.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise PlanError(f"--model {model!r}: the directory holds no config.json", exit_code=1)
        return _read_json(config_file, "--model")
    if path.is_file():
        return _read_json(path, "--model")
    name = model.rstrip("/").rsplit("/", 1)[-1].lower()
    if name in shipped_models():
        return _read_json(MODEL_CONFIGS / f"{name}.json", "--model")
    raise PlanError(
        f"--model {model!r}: no such file or directory, and not a shipped config ({', '.join(shipped_models())})",
        exit_code=1,
    )


# --------------------------------------------------------------------------------------------------- settings


def normalize_dtype(torch_dtype: str) -> str:
    name = canonical_dtype(torch_dtype)
    if name is None:
        raise PlanError(f"--torch_dtype {torch_dtype!r}: use one of {', '.join(dtype_choices())}")
    return name


def normalize_quantization(quantization_bit: int | str | None) -> int | None:
    try:
        return parse_quantization(quantization_bit)
    except SpellingError:
        raise PlanError(f"--quantization_bit {quantization_bit!r}: use 4, 8 or none") from None


@dataclass(frozen=True)
class PlanSettings:
    """The training settings memory depends on; field names are the training flags'."""

    method: str = DEFAULT_METHOD
    pre_seq_len: int = 128
    prefix_hidden_size: int | None = None  # prefix_tuning's MLP width; None: the model's hidden size
    prefix_dropout: float = 0.1
    prompt_encoder_type: str = "lstm"  # ptuning_v1: lstm (BiLSTM + MLP) or mlp
    prompt_encoder_hidden_size: int | None = None  # ptuning_v1; None: the model's hidden size
    lora_rank: int = 8
    lora_target_modules: str = "all-linear"  # comma-separated names, "attention" (q,k,v,o) or all-linear
    lora_dropout: float = 0.05
    quantization_bit: int | None = None
    torch_dtype: str = "bf16"  # compute dtype; the CLI's default: bf16 on a GPU, fp32 on CPU (the trainer's)
    batch_size: int = 8  # per device (--per_device_train_batch_size; the Trainer's default is 8)
    seq_len: int = 193  # tokens per example; the training defaults: 64 + 128 + eos
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    zero_stage: int = 0
    num_gpus: int = 1
    offload_optimizer: bool = False  # DeepSpeed offload_optimizer.device == "cpu"
    offload_param: bool = False  # DeepSpeed offload_param.device == "cpu" (stage 3)
    device: str = "cuda"  # what trains: "cuda" or "cpu" (dropout masks are 1 byte on CUDA, 4 on CPU)

    def __post_init__(self) -> None:
        object.__setattr__(self, "torch_dtype", normalize_dtype(self.torch_dtype))
        object.__setattr__(self, "quantization_bit", normalize_quantization(self.quantization_bit))
        if self.method not in CATALOG:
            raise PlanError(f"--method {self.method!r}: use one of {', '.join(CATALOG)}")
        for name in ("pre_seq_len", "lora_rank", "batch_size", "seq_len", "num_gpus"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("prefix_hidden_size", "prompt_encoder_hidden_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("zero_stage", self.zero_stage, minimum=0)
        if self.zero_stage > 3:
            raise PlanError(f"--zero_stage {self.zero_stage}: use 0, 1, 2 or 3")
        for name in ("prefix_dropout", "lora_dropout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < 1:
                raise PlanError(f"--{name} {value!r}: must be in [0, 1)")
        if self.prompt_encoder_type not in ("lstm", "mlp"):
            raise PlanError(f"--prompt_encoder_type {self.prompt_encoder_type!r}: use lstm or mlp")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise PlanError(f"--attn_implementation {self.attn_implementation!r}: use sdpa or eager")
        if self.device not in ("cuda", "cpu"):
            raise PlanError(f"--device {self.device!r}: use cuda or cpu")
        if self.quantization_bit not in self.spec.quantizations:
            raise PlanError(
                f"--method {self.method} with --quantization_bit {self.quantization_bit}: a 4/8-bit backbone cannot be "
                "fine-tuned (bitsandbytes weights take no optimizer step)"
            )

    @property
    def spec(self) -> MethodSpec:
        return CATALOG[self.method]

    @property
    def adapts_weights(self) -> bool:
        """Adapters beside the frozen weights (they change what the backbone computes, not the backbone)."""
        return not self.spec.shares_backbone and not self.spec.saves_backbone

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.torch_dtype]

    @property
    def prefix_len(self) -> int:
        """Keys/values a prefix adds to every layer's attention."""
        return self.pre_seq_len if self.spec.kind == KV_PREFIX else 0

    @property
    def layer_seq_len(self) -> int:
        """Positions every layer (and the loss) runs over: virtual tokens are part of the sequence."""
        return self.seq_len + (self.pre_seq_len if self.spec.kind == VIRTUAL_TOKENS else 0)


# Settings whose training flag is spelled differently.
_FLAGS = {"batch_size": "per_device_train_batch_size"}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise PlanError(f"--{_FLAGS.get(name, name)} {value!r}: must be {what}")


# ------------------------------------------------------------------------------------------ trainable parameters


def lora_targets(shape: ModelShape, target_modules: str) -> list[Linear]:
    """The linear layers LoRA adapts in each decoder layer (PEFT's all-linear: all but the output head)."""
    linears = {lin.name: lin for lin in shape.linears()}
    spec = target_modules.strip()
    if spec == "all-linear":
        return list(linears.values())
    # ChatGLM's original names, and the shorthand for the attention projections, map onto the GLM modules.
    aliases = {
        "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "query_key_value": ["q_proj", "k_proj", "v_proj"],
        "dense": ["o_proj"],
        "dense_h_to_4h": [n for n in ("gate_up_proj", "gate_proj", "up_proj") if n in linears],
        "dense_4h_to_h": ["down_proj"],
    }
    chosen: dict[str, Linear] = {}
    for name in (part.strip() for part in spec.split(",")):
        if not name:
            continue
        names = aliases.get(name, [name])
        unknown = [n for n in names if n not in linears]
        if unknown:
            raise PlanError(
                f"--lora_target_modules {target_modules!r}: {shape.model_type} has no {unknown[0]!r} "
                f"(its linear layers: {', '.join(linears)}; or attention, all-linear)"
            )
        chosen.update({n: linears[n] for n in names})
    if not chosen:
        raise PlanError(f"--lora_target_modules {target_modules!r}: names no module")
    return list(chosen.values())


def trainable_parameters(shape: ModelShape, settings: PlanSettings) -> int:
    """What the optimizer updates, counted as ``ptuning_v2.methods`` builds it (each method's catalog formula)."""
    return settings.spec.trainable(shape, settings)


# ---------------------------------------------------------------------------------------------------- weights


def quantized_bytes(weights: int, out_rows: int, quantization_bit: int) -> int:
    """Storage of bitsandbytes weights: nf4 packs two per byte plus an fp32 absmax per 64-weight block; LLM.int8
    keeps one byte per weight plus an fp32 scale per output row."""
    if quantization_bit == 4:
        return math.ceil(weights / 2) + 4 * math.ceil(weights / NF4_BLOCKSIZE)
    return weights + 4 * out_rows


def weight_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """The backbone's weights as loaded: quantised decoder linears, everything else in the compute dtype."""
    b = settings.compute_bytes
    if settings.quantization_bit is None:
        return shape.total_parameters * b
    quantized = 0
    for lin in shape.linears():
        quantized += quantized_bytes(
            lin.in_features * lin.out_features, lin.out_features, settings.quantization_bit
        )
    kept = shape.total_parameters - shape.num_layers * shape.layer_linear_weights
    return shape.num_layers * quantized + kept * b


# ------------------------------------------------------------------------------------------------ activations


@dataclass(frozen=True)
class _Dims:
    """Token counts of one training step."""

    batch: int
    seq: int  # positions per row in every layer (virtual tokens included)
    kv: int  # key/value positions per row (prefix included)
    mask: bool  # whether SDPA gets a materialised mask (prefix or padding)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def _dims(settings: PlanSettings) -> _Dims:
    seq = settings.layer_seq_len
    # A prefix makes the keys longer than the queries, so transformers always builds a mask; without one it
    # drops an all-ones mask and SDPA runs causal. A batch of several examples is padded, so it has a mask.
    mask = settings.prefix_len > 0 or settings.batch_size > 1
    return _Dims(settings.batch_size, seq, seq + settings.prefix_len, mask)


def _lora_layer_saved(shape: ModelShape, settings: PlanSettings, tokens: int) -> int:
    """What LoRA's adapters save in one layer beyond the frozen layer's own tensors."""
    b, a = settings.compute_bytes, ADAPTER_BYTES
    targets = lora_targets(shape, settings.lora_target_modules)
    saved = 0
    if settings.lora_dropout > 0:
        # Each adapter runs its own dropout: it saves the dropped input (lora_A's input) and the dropout mask.
        mask = 1 if settings.device == "cuda" else a
        saved += sum(tokens * lin.in_features * (a + mask) for lin in targets)
    elif b < a:
        # PEFT casts the 16-bit input to the adapters' fp32 once per adapter.
        saved += sum(tokens * lin.in_features * a for lin in targets)
    else:
        # fp32 throughout: the adapters of one input share the tensor the frozen layer reads.
        saved += sum(
            tokens * width * b for width in {lin.source: lin.in_features for lin in targets}.values()
        )
    return saved + sum(tokens * settings.lora_rank * a for _ in targets)  # lora_A's output, saved by lora_B


def layer_activation_bytes(shape: ModelShape, settings: PlanSettings, first: bool = False) -> int:
    """Bytes one decoder layer saves for backward (see the module docstring for the formula)."""
    d = _dims(settings)
    b, t, h = settings.compute_bytes, d.tokens, shape.hidden_size
    heads, hd = shape.num_heads, shape.head_dim
    spec = settings.spec
    # The prefix and LoRA leave the embeddings frozen, so the first layer's input needs no gradient: its first
    # norm saves nothing, and with a prefix neither does its RoPE (the queries need no gradient there).
    input_frozen = first and (spec.kind == KV_PREFIX or settings.adapts_weights)
    norms = shape.norms_per_layer - (1 if input_frozen else 0)
    saved = norms * (t * h * 4 + t * 4)  # fp32 input + rsqrt per norm
    if shape.rope_per_layer and not (first and spec.kind == KV_PREFIX):
        # position_ids are per row when a method passes them (prefix, virtual tokens), one row otherwise.
        rows = d.batch if spec.prompt_length else 1
        saved += 2 * rows * d.seq * shape.rotary_dim * b
    if settings.attn_implementation == "eager":
        probs = d.batch * heads * d.seq * d.kv
        saved += (
            t * heads * hd * b + 2 * d.batch * heads * d.kv * hd * b + probs * 4 + (probs * b if b < 4 else 0)
        )
    else:
        kv_heads = heads if d.mask else shape.num_kv_heads
        saved += 2 * t * heads * hd * b + 2 * d.batch * kv_heads * d.kv * hd * b + d.batch * heads * d.seq * 4
        if d.mask:
            saved += d.batch * d.seq * d.kv * b
    inter = shape.intermediate_size
    saved += (3 if shape.gated_mlp else 1) * t * inter * b
    if settings.adapts_weights:
        saved += _lora_layer_saved(shape, settings, t)
    if spec.saves_backbone:
        # Each norm's normalised output (its weight trains) and every linear layer's input.
        saved += shape.norms_per_layer * t * h * b
        saved += sum(
            t * width * b for width in {lin.source: lin.in_features for lin in shape.linears()}.values()
        )
    return saved


@dataclass(frozen=True)
class Activations:
    """Saved tensors at the start of the backward pass, split for ``describe``."""

    layers: int  # all decoder layers (or, checkpointed, their inputs)
    outside: int  # final norm, loss log-softmax, prefix/prompt encoder
    one_layer: int  # one layer's full set: what checkpointing recomputes at a time

    @property
    def total(self) -> int:
        return self.layers + self.outside


def activation_bytes(shape: ModelShape, settings: PlanSettings) -> Activations:
    d = _dims(settings)
    b, t, h, p = settings.compute_bytes, d.tokens, shape.hidden_size, settings.pre_seq_len
    one_layer = layer_activation_bytes(shape, settings)
    outside = t * h * 4 + t * 4 + t * shape.vocab_size * 4  # final norm, fp32 log-softmax of the loss
    if settings.spec.saves_backbone:
        outside += t * h * b + t * 8  # final norm's output, the embedding's indices
    if settings.spec.kind == KV_PREFIX and settings.prefix_dropout > 0:
        outside += d.batch * p * shape.kv_size * (1 if settings.device == "cuda" else ADAPTER_BYTES)
    outside += settings.spec.encoder_activations(shape, settings) * ADAPTER_BYTES  # its encoder's, once
    if settings.gradient_checkpointing:
        # Each checkpointed layer keeps its input; the prefix in the compute dtype stays alive in the cache.
        layers = shape.num_layers * t * h * b
        if settings.spec.kind == KV_PREFIX:
            layers += d.batch * p * shape.kv_size * b
    else:
        first = layer_activation_bytes(shape, settings, first=True)
        layers = first + (shape.num_layers - 1) * one_layer
    return Activations(layers=layers, outside=outside, one_layer=one_layer)


# -------------------------------------------------------------------------------------------------- workspace


@dataclass(frozen=True)
class Workspace:
    loss: int  # logits and their gradients around the loss
    layer: int  # one layer's backward pass
    dequantized: int  # bitsandbytes' dequantised weight for one matmul
    gathered: int  # ZeRO-3: one layer's weights gathered


def workspace_bytes(shape: ModelShape, settings: PlanSettings) -> Workspace:
    d = _dims(settings)
    b, t, vocab = settings.compute_bytes, d.tokens, shape.vocab_size
    # Forward: logits in the compute dtype and the loss's fp32 copy of them (the saved log-softmax is counted
    # with the activations). Backward: the nll gradient and the log-softmax gradient, both fp32.
    loss = max(t * vocab * b + (t * vocab * 4 if b < 4 else 0), 2 * t * vocab * 4)
    mlp = 4 * t * shape.intermediate_size * b
    if settings.attn_implementation == "eager":
        attention = 2 * d.batch * shape.num_heads * d.seq * d.kv * 4
    else:
        attention = t * shape.q_dim * b + 2 * d.batch * shape.num_heads * d.kv * shape.head_dim * b
    layer = max(mlp, attention)
    dequantized = 0
    if settings.quantization_bit is not None:
        dequantized = max(lin.in_features * lin.out_features for lin in shape.linears()) * b
    gathered = 0
    if settings.zero_stage == 3 and settings.num_gpus > 1 and settings.quantization_bit is None:
        gathered = shape.layer_parameters * b
    return Workspace(loss=loss, layer=layer, dequantized=dequantized, gathered=gathered)


# ------------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class TrainableState:
    parameters: int
    gradients: int
    optimizer: int  # fp32 master (where there is one) + AdamW's two moments
    host: int  # what DeepSpeed offloads to CPU memory (not in the device's total)


def trainable_state_bytes(trainable: int, settings: PlanSettings) -> TrainableState:
    n, gpus, stage = trainable, settings.num_gpus, settings.zero_stage
    param_bytes = settings.compute_bytes if settings.spec.saves_backbone else ADAPTER_BYTES
    master = 4 if (param_bytes < 4 or stage >= 1) else 0  # ZeRO always keeps an fp32 partition
    parameters = n * param_bytes // (gpus if stage >= 3 else 1)
    gradients = n * param_bytes // (gpus if stage >= 2 else 1)
    optimizer = n * (master + 8) // (gpus if stage >= 1 else 1)
    host = 0
    if settings.offload_optimizer:
        host, optimizer = host + optimizer, 0
    if settings.offload_param and stage >= 3:
        host, parameters = host + parameters, 0
    return TrainableState(parameters=parameters, gradients=gradients, optimizer=optimizer, host=host)


@dataclass(frozen=True)
class MemoryPlan:
    """The expected peak of one training process (one GPU), split at the moment it happens."""

    model_name: str
    shape: ModelShape
    settings: PlanSettings
    total_parameters: int
    trainable_parameters: int
    weights: int  # the frozen backbone (full fine-tuning: nothing frozen, its weights are trainable state)
    trainable: int  # trained parameters + gradients + optimizer state present at the peak
    activations: int  # saved for backward, alive at the peak
    workspace: int  # transient at the peak
    phase: str  # "backward start", "backward end" or "optimizer step"
    phases: dict[str, int]  # each moment's total
    parts: dict[str, int]  # finer split, all moments' inputs
    host_bytes: int = 0  # offloaded by DeepSpeed to CPU memory
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.weights + self.trainable + self.activations + self.workspace

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "shape": asdict(self.shape),
            "settings": asdict(self.settings),
            "parameters": {"total": self.total_parameters, "trainable": self.trainable_parameters},
            "bytes": {
                "weights": self.weights,
                "trainable": self.trainable,
                "activations": self.activations,
                "workspace": self.workspace,
                "total": self.total_bytes,
            },
            "gib": {
                key: round(value / GIB, 3)
                for key, value in (
                    ("weights", self.weights),
                    ("trainable", self.trainable),
                    ("activations", self.activations),
                    ("workspace", self.workspace),
                    ("total", self.total_bytes),
                )
            },
            "phase": self.phase,
            "phases": self.phases,
            "parts": self.parts,
            "host_bytes": self.host_bytes,
            "notes": self.notes,
        }

    def summary(self) -> str:
        """One line for a training script's log."""
        return (
            f"memory plan: {_gib(self.total_bytes)} GiB per process at the {self.phase} (weights "
            f"{_gib(self.weights)}, trainable {_gib(self.trainable)}, activations {_gib(self.activations)}, "
            f"workspace {_gib(self.workspace)}; {self.settings.method}, batch {self.settings.batch_size} x "
            f"{self.settings.seq_len} tokens)"
        )

    def describe(self) -> str:
        s, shape = self.settings, self.shape
        quant = {None: s.torch_dtype, 4: f"int4 (nf4) + {s.torch_dtype}", 8: f"int8 + {s.torch_dtype}"}
        method = s.method + (f" (pre_seq_len {s.pre_seq_len})" if s.spec.prompt_length else "")
        if s.adapts_weights:
            method += f" (rank {s.lora_rank}, {s.lora_target_modules})"
        zero = f"ZeRO-{s.zero_stage}" if s.zero_stage else "no ZeRO"
        share = self.trainable_parameters / self.total_parameters * 100
        parts = self.parts
        lines = [
            f"memory plan: {self.model_name} ({shape.model_type}, {shape.num_layers} layers, hidden "
            f"{shape.hidden_size}, {shape.num_heads}/{shape.num_kv_heads} heads), {method}",
            f"backbone {quant[s.quantization_bit]}; batch {s.batch_size} x {s.seq_len} tokens, gradient "
            f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.attn_implementation} attention, "
            f"{zero} on {s.num_gpus} {s.device} device(s)",
            f"parameters: {self.total_parameters:,} in the backbone, {self.trainable_parameters:,} trainable "
            f"({share:.4g}%)",
            "",
            "| part | GiB | what |",
            "|---|---:|---|",
            f"| weights | {_gib(self.weights)} | frozen backbone as loaded |",
            f"| trainable | {_gib(self.trainable)} | trained weights {_gib(parts['trainable_parameters'])}, gradients "
            f"{_gib(parts['gradients'] if self.phase != 'backward start' else 0)}, AdamW state "
            f"{_gib(parts['optimizer'])} |",
            f"| activations | {_gib(self.activations)} | saved for backward at the peak |",
            f"| workspace | {_gib(self.workspace)} | transient at the peak |",
            f"| **total** | **{_gib(self.total_bytes)}** | peak at the {self.phase} ({self.total_bytes / 1e9:.2f} GB) |",
        ]
        others = ", ".join(
            f"{name} {_gib(value)}" for name, value in self.phases.items() if name != self.phase
        )
        lines.append(f"other moments (GiB): {others}")
        if self.host_bytes:
            lines.append(f"offloaded to CPU memory by DeepSpeed: {_gib(self.host_bytes)} GiB")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def plan_memory(
    config: Mapping[str, Any] | Any, settings: PlanSettings | None = None, model_name: str | None = None
) -> MemoryPlan:
    """The expected peak memory of one training process for ``config`` (a dict or ``PretrainedConfig``)."""
    settings = settings or PlanSettings()
    shape = model_shape(config)
    if model_name is None:
        model_name = str(_config_dict(config).get("_name_or_path") or shape.model_type)
    trainable = trainable_parameters(shape, settings)
    total = shape.total_parameters

    frozen = 0 if settings.spec.saves_backbone else weight_bytes(shape, settings)
    if settings.zero_stage == 3 and settings.quantization_bit is None:
        frozen //= settings.num_gpus
    host = 0
    if settings.offload_param and settings.zero_stage == 3:
        host, frozen = frozen, 0
    state = trainable_state_bytes(trainable, settings)
    host += state.host
    acts = activation_bytes(shape, settings)
    work = workspace_bytes(shape, settings)

    layer_work = work.layer + work.dequantized + work.gathered
    # Checkpointing recomputes one layer's activations at a time in the backward pass: workspace on top of the
    # checkpoints (without it, that layer's activations are among the saved ones already).
    recomputed = acts.one_layer if settings.gradient_checkpointing else 0
    # Three candidate peaks: all activations saved (the loss's or the last layer's workspace on top), all
    # gradients produced (the first layer still backpropagating), and the optimizer step.
    moments = {
        "backward start": (
            state.parameters + state.optimizer,
            acts.total,
            max(work.loss, recomputed + layer_work),
        ),
        # The first layer's activations are gone by the time the last gradients (the embeddings') exist.
        "backward end": (state.parameters + state.gradients + state.optimizer, 0, layer_work),
        "optimizer step": (state.parameters + state.gradients + state.optimizer, 0, 0),
    }
    phases = {name: frozen + sum(parts) for name, parts in moments.items()}
    phase = max(phases, key=lambda name: phases[name])
    trainable_bytes, activations, workspace = moments[phase]

    notes = []
    if settings.spec.kind == KV_PREFIX:
        notes.append(
            f"prefix: {settings.pre_seq_len} x {shape.kv_size} = {trainable:,} values "
            f"({shape.num_layers} layers x 2 x {shape.num_kv_heads} kv heads x {shape.head_dim})"
            if trainable == settings.pre_seq_len * shape.kv_size  # a plain table, no MLP
            else f"prefix MLP width {settings.prefix_hidden_size or shape.hidden_size}"
        )
    if shape.model_type == "chatglm" and not shape.gated_mlp:
        notes.append(
            "the first ChatGLM is planned on the GLM code path; this recipe trains ChatGLM2/3 and GLM-4"
        )
    if settings.device == "cuda":
        notes.append("not included: the CUDA context and libraries (about 0.3-1 GiB) and allocator reserve")
    parts = {
        "frozen_weights": frozen,
        "trainable_parameters": state.parameters,
        "gradients": state.gradients,
        "optimizer": state.optimizer,
        "activations_layers": acts.layers,
        "activations_outside_layers": acts.outside,
        "activations_one_layer": acts.one_layer,
        "workspace_loss": work.loss,
        "workspace_layer": work.layer,
        "workspace_dequantized_weight": work.dequantized,
        "workspace_zero3_gathered": work.gathered,
    }
    return MemoryPlan(
        model_name=model_name,
        shape=shape,
        settings=settings,
        total_parameters=total,
        trainable_parameters=trainable,
        weights=frozen,
        trainable=trainable_bytes,
        activations=activations,
        workspace=workspace,
        phase=phase,
        phases=phases,
        parts=parts,
        host_bytes=host,
        notes=notes,
    )


# ----------------------------------------------------------------------------------------------------- device


def cuda_available() -> bool:
    """Whether torch sees a GPU; False (not an error) where torch is missing."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def device_memory_bytes() -> int:
    """Total memory of the device training would run on: the current CUDA device's, else the machine's RAM."""
    if cuda_available():
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -------------------------------------------------------------------------------------------------------- CLI


def deepspeed_settings(path: str) -> dict[str, Any]:
    """ZeRO stage and offloads from a DeepSpeed config file (``--deepspeed``)."""
    config = _read_json(Path(path).expanduser(), "--deepspeed")
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise PlanError(f"--deepspeed {path!r}: zero_optimization must be an object", exit_code=1)
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 3:
        raise PlanError(
            f"--deepspeed {path!r}: zero_optimization.stage must be 0-3, got {stage!r}", exit_code=1
        )

    def offloaded(key: str) -> bool:
        value = zero.get(key)
        return isinstance(value, dict) and value.get("device") in ("cpu", "nvme")

    return {
        "zero_stage": stage,
        "offload_optimizer": offloaded("offload_optimizer"),
        "offload_param": offloaded("offload_param"),
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise PlanError(message)


def build_parser() -> argparse.ArgumentParser:
    """The training flags memory depends on. Defaults are None here: a ``--config`` file fills what the command
    line leaves out, then PlanSettings' defaults (the trainer's) fill the rest."""
    parser = _Parser(
        prog="python -m ptuning_v2.plan",
        description="Expected peak memory of one training process (per GPU), from the model's config alone.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an unknown training flag must not pass for an abbreviation of one of ours
    )
    add = parser.add_argument
    shipped = ", ".join(shipped_models())
    add(
        "--model",
        "--model_name_or_path",
        dest="model",
        help=f"{shipped}, a config.json, or a model directory",
    )
    add("--config", help="the trainer's settings file (YAML/JSON); flags given beside it win")
    add("--method", help=", ".join(CATALOG))
    add("--pre_seq_len", type=int, help="prefix / virtual tokens (default 128)")
    add(
        "--prefix_projection", type=parse_bool, help="true: the prefix_tuning MLP (as --method prefix_tuning)"
    )
    add("--prefix_hidden_size", type=int, help="prefix_tuning MLP width (default: hidden size)")
    add("--prefix_dropout", type=float)
    add("--prompt_encoder_type", help="ptuning_v1: lstm (default) or mlp")
    add("--prompt_encoder_hidden_size", type=int)
    add("--lora_rank", type=int, help="default 8")
    add("--lora_target_modules", help="comma-separated names, attention (q,k,v,o) or all-linear (default)")
    add("--lora_dropout", type=float, help="default 0.05")
    add("--quantization_bit", help="4 (nf4), 8 (LLM.int8) or none")
    add(
        "--torch_dtype",
        help="fp32, bf16 or fp16; default bf16 on a GPU, fp32 on CPU (bf16 for a 4/8-bit backbone on a CPU with "
        "AVX512-BF16/AMX, as the trainer chooses)",
    )
    add("--batch_size", "--per_device_train_batch_size", dest="batch_size", type=int, help="default 8")
    add("--seq_len", type=int, help="tokens per example (default: the two lengths below)")
    add("--max_source_length", type=int, help="seq_len = max_source_length + max_target_length + 1 (eos)")
    add("--max_target_length", type=int)
    add("--gradient_checkpointing", nargs="?", const=True, type=parse_bool)
    add("--attn_implementation", help="sdpa (default) or eager")
    add("--deepspeed", help="DeepSpeed config JSON: ZeRO stage and offloads")
    add("--zero_stage", type=int, help="0-3 (default: from --deepspeed, else 0)")
    add("--num_gpus", type=int, help="processes sharing ZeRO state (default 1)")
    add("--device", default="auto", help="cuda, cpu or auto (cuda when torch sees one)")
    add("--json", action="store_true", help="print the plan as JSON")
    add("--summary", action="store_true", help="print one line instead of the table")
    add("--no_device_check", action="store_true", help="do not compare with this machine's device memory")
    add(
        "--ignore_unknown_args",
        action="store_true",
        help="accept (and ignore) other training flags, so the training command's arguments can be passed whole",
    )
    return parser


# Keys of the trainer's settings file and the destinations they fill (the file's other keys do not matter here).
_CONFIG_KEYS = {
    "model_name_or_path": "model",
    "per_device_train_batch_size": "batch_size",
    **{
        name: name
        for name in (
            "method pre_seq_len prefix_projection prefix_hidden_size prefix_dropout prompt_encoder_type "
            "prompt_encoder_hidden_size lora_rank lora_target_modules lora_dropout quantization_bit torch_dtype "
            "max_source_length max_target_length gradient_checkpointing deepspeed"
        ).split()
    },
}


def _fill_from_config_file(args: argparse.Namespace) -> None:
    """What ``--config`` sets and the command line does not (flags win, as in the trainer)."""
    import yaml  # a dependency of the trainer's settings files

    path = Path(args.config).expanduser()
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PlanError(
            f"--config {args.config!r}: cannot read it ({err.strerror or err})", exit_code=1
        ) from None
    except yaml.YAMLError as err:
        raise PlanError(
            f"--config {args.config!r}: not valid YAML/JSON ({err})".replace("\n", " "), 1
        ) from None
    if not isinstance(values, dict):
        raise PlanError(f"--config {args.config!r}: expected a mapping of settings", exit_code=1)
    lengths_given = args.max_source_length is not None or args.max_target_length is not None
    for key, dest in _CONFIG_KEYS.items():
        if key not in values or getattr(args, dest) is not None:
            continue
        if (
            dest in ("max_source_length", "max_target_length")
            and args.seq_len is not None
            and not lengths_given
        ):
            continue  # --seq_len on the command line wins over the file's lengths
        value = values[key]
        if dest in ("gradient_checkpointing", "prefix_projection") and value is not None:
            try:
                value = parse_bool(value)
            except ValueError:
                raise PlanError(f"--config {args.config!r}: {key}: {value!r} is not a boolean") from None
        setattr(args, dest, value)


def settings_from_args(args: argparse.Namespace) -> PlanSettings:
    if args.config:
        _fill_from_config_file(args)
    lengths = (args.max_source_length, args.max_target_length)
    if args.seq_len is not None and lengths != (None, None):
        raise PlanError(
            "--seq_len: give either --seq_len or --max_source_length/--max_target_length, not both"
        )
    values: dict[str, Any] = {}
    if args.seq_len is not None:
        values["seq_len"] = args.seq_len
    elif lengths != (None, None):
        for flag, value in zip(("max_source_length", "max_target_length"), lengths):
            if value is not None:
                _check_int(flag, value, minimum=1)
        # ptuning_v2.data: at most max_source_length + max_target_length + 1 (eos); the trainer's defaults fill in.
        values["seq_len"] = (lengths[0] or 64) + (lengths[1] or 128) + 1
    device = "cuda" if args.device == "auto" and cuda_available() else args.device
    values["device"] = "cpu" if device == "auto" else device
    torch_dtype = None if args.torch_dtype in (None, "auto") else args.torch_dtype
    if torch_dtype is None and values["device"] == "cpu":
        from .quantization import cpu_compute_dtype  # imports torch: only when planning for this CPU

        quantized = normalize_quantization(args.quantization_bit) is not None
        torch_dtype = cpu_compute_dtype(quantized)
    values["torch_dtype"] = torch_dtype or "bf16"
    if args.deepspeed:
        values.update(deepspeed_settings(args.deepspeed))
    if args.zero_stage is not None:
        if args.deepspeed and args.zero_stage != values["zero_stage"]:
            raise PlanError(
                f"--zero_stage {args.zero_stage}: --deepspeed {args.deepspeed!r} says stage {values['zero_stage']}"
            )
        values["zero_stage"] = args.zero_stage
    method = args.method
    if args.prefix_projection and method in (None, *CATALOG):
        # As the trainer: the prefix with its projection switched on is Prefix-Tuning.
        method = chosen_method(method or DEFAULT_METHOD, {"prefix_projection": True})
    given = {
        "method": method,
        "pre_seq_len": args.pre_seq_len,
        "prefix_hidden_size": args.prefix_hidden_size,
        "prefix_dropout": args.prefix_dropout,
        "prompt_encoder_type": args.prompt_encoder_type,
        "prompt_encoder_hidden_size": args.prompt_encoder_hidden_size,
        "lora_rank": args.lora_rank,
        "lora_target_modules": args.lora_target_modules,
        "lora_dropout": args.lora_dropout,
        "quantization_bit": args.quantization_bit,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "attn_implementation": args.attn_implementation,
        "num_gpus": args.num_gpus,
    }
    values.update({key: value for key, value in given.items() if value is not None})
    return PlanSettings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and not args.ignore_unknown_args:
            raise PlanError(
                f"unrecognized arguments: {' '.join(unknown)} (--ignore_unknown_args accepts them)"
            )
        settings = settings_from_args(args)
        model = args.model or "models/glm-zh-tiny"  # the trainer's default backbone
        plan = plan_memory(load_model_config(model), settings, model_name=model)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    device_bytes = None if args.no_device_check else device_memory_bytes()
    if args.json:
        result = plan.to_dict()
        result["device_memory_bytes"] = device_bytes
        print(json.dumps(result, indent=2))
    elif args.summary:
        print(plan.summary())
    else:
        print(plan.describe())
    if device_bytes is not None and plan.total_bytes > device_bytes:
        where = "this GPU" if cuda_available() else "this machine's RAM"
        print(
            f"warning: the plan needs {_gib(plan.total_bytes)} GiB per process, more than {where} has "
            f"({_gib(device_bytes)} GiB); consider --quantization_bit 4, --gradient_checkpointing, a smaller "
            "--per_device_train_batch_size or shorter sequences",
            file=sys.stderr,
        )
    return 0


_EPILOG = """\
THUDM's ChatGLM-6B P-Tuning v2 setting (int4, PRE_SEQ_LEN=128, batch 1, 64 + 64 tokens, fp16), which their README
says trains in 7 GB:
  python -m ptuning_v2.plan --model chatglm-6b --pre_seq_len 128 --quantization_bit 4 --torch_dtype fp16 \\
      --per_device_train_batch_size 1 --seq_len 128 --device cuda
plans 4.90 GiB (5.26 GB) per GPU: weights 3.95 GiB, trainable state 0.33 GiB, activations 0.48 GiB, workspace
0.14 GiB. Not counted, and part of the 7 GB nvidia-smi shows: the CUDA context and libraries, cuBLAS workspaces,
the caching allocator's reserve. THUDM's own int4 kernels keep fp16 row scales where bitsandbytes' nf4 keeps fp32
block absmax (0.33 GiB less).
The memory model and its formulas: python -c "import ptuning_v2.plan as p; help(p)". Measured against real runs:
benchmarks/results/plan_validation.md.
"""


if __name__ == "__main__":
    sys.exit(main())
