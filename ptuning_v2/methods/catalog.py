"""What each tuning method is and allows, readable without torch: the planner, the shell scripts and the loaders
all read this one list.

An entry names the module that implements the method (under ``ptuning_v2.methods``) and the handle class in it,
and states its capabilities:

- ``kind``: ``kv_prefix`` (keys and values in front of every layer's), ``virtual_tokens`` (embeddings in front
  of the input) or ``weights`` (changes the backbone's weights). The first two act as a key/value prefix at
  inference, so checkpoints of them share one backbone when served;
- ``learning_rate``: the default when ``--learning_rate`` is not given;
- ``saves_backbone``: its checkpoint is a whole model (loaded as the backbone itself);
- ``quantizations``: the backbones it trains over (None: unquantised; 4, 8: bitsandbytes);
- ``implies``: settings choosing it sets (Prefix-Tuning is the prefix with its projection MLP);
- ``trainable``: the planner's count of what the optimizer updates, from a model shape (``plan.ModelShape``) and
  the settings (``plan.PlanSettings``); ``tests/test_methods.py`` checks it against the built method;
- ``encoder_activations``: the planner's count of the fp32 values its encoder saves for backward, once a step.

The method's settings are its config dataclass's fields (in its module): they become ``ptuning_v2.train`` flags.

    python -m ptuning_v2.methods     # the names, one line (what scripts/train_pt2.sh offers)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

KV_PREFIX = "kv_prefix"
VIRTUAL_TOKENS = "virtual_tokens"
WEIGHTS = "weights"
ANY_QUANTIZATION = (None, 4, 8)
DEFAULT_METHOD = "ptuning_v2"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    module: str
    handle: str
    kind: str
    learning_rate: float
    trainable: Callable[[Any, Any], int]
    saves_backbone: bool = False
    quantizations: tuple[int | None, ...] = ANY_QUANTIZATION
    implies: Mapping[str, Any] = field(default_factory=dict)
    encoder_activations: Callable[[Any, Any], int] = lambda shape, settings: 0

    @property
    def shares_backbone(self) -> bool:
        """Whether checkpoints of it act as a key/value prefix at inference, so many share one backbone."""
        return self.kind in (KV_PREFIX, VIRTUAL_TOKENS)

    @property
    def prompt_length(self) -> bool:
        """Whether ``pre_seq_len`` sizes it (the prefix and virtual-token methods)."""
        return self.kind in (KV_PREFIX, VIRTUAL_TOKENS)


def _prefix_mlp(shape: Any, settings: Any) -> int:
    """Embedding(P, kv_size) -> Linear(kv_size, width) -> Tanh -> Linear(width, kv_size)."""
    width, kv = settings.prefix_hidden_size or shape.hidden_size, shape.kv_size
    return settings.pre_seq_len * kv + (kv * width + width) + (width * kv + kv)


def lstm_parameters(input_size: int, hidden: int) -> int:
    """A 2-layer bidirectional nn.LSTM: per layer and direction 4 gates of (input + hidden) weights, 2 biases."""
    first = 2 * (4 * hidden * (input_size + hidden) + 8 * hidden)
    second = 2 * (4 * hidden * (2 * hidden + hidden) + 8 * hidden)
    return first + second


def _encoder_width(shape: Any, settings: Any) -> int:
    """A prompt encoder's MLP width: ``prompt_encoder_hidden_size``, by default the backbone's hidden size."""
    return settings.prompt_encoder_hidden_size or shape.hidden_size


def _prompt_encoder(shape: Any, settings: Any) -> int:
    """Embedding(P, h) -> [2-layer BiLSTM] -> Linear(., width) -> ReLU -> Linear(width, h)."""
    h, width = shape.hidden_size, _encoder_width(shape, settings)
    if settings.prompt_encoder_type == "lstm":
        encoder, mlp_in = lstm_parameters(h, width // 2), 2 * (width // 2)
    else:
        encoder, mlp_in = 0, h
    return settings.pre_seq_len * h + encoder + (mlp_in * width + width) + (width * h + h)


def _residual_prompt_encoder(shape: Any, settings: Any) -> int:
    """Embedding(P, h), plus Linear(h, width) -> ReLU -> Linear(width, h) -> LayerNorm(h) of itself."""
    h, width = shape.hidden_size, _encoder_width(shape, settings)
    return settings.pre_seq_len * h + (h * width + width) + (width * h + h) + 2 * h


def _lora(shape: Any, settings: Any) -> int:
    linears = shape.linear_layers(settings.lora_target_modules)
    return shape.num_layers * sum(
        settings.lora_rank * (lin.in_features + lin.out_features) for lin in linears
    )


_SPECS = (
    MethodSpec("ptuning_v2", "deep prompts: a key/value table per layer", "prefix", "PrefixMethod", KV_PREFIX, 1e-1,
               lambda shape, s: s.pre_seq_len * shape.kv_size),
    MethodSpec("prefix_tuning", "deep prompts through a 2-layer MLP", "prefix", "PrefixMethod", KV_PREFIX, 1e-2,
               _prefix_mlp, implies={"prefix_projection": True},
               # the MLP's input and tanh output
               encoder_activations=lambda m, s: s.pre_seq_len * (m.kv_size + (s.prefix_hidden_size or m.hidden_size))),
    MethodSpec("ptuning_v1", "virtual tokens from an LSTM/MLP prompt encoder", "ptuning_v1", "PTuningV1",
               VIRTUAL_TOKENS, 1e-2, _prompt_encoder,
               # the prompt encoder's gates and MLP, roughly
               encoder_activations=lambda m, s: s.pre_seq_len * (m.hidden_size + 12 * _encoder_width(m, s))),
    MethodSpec("prompt_tuning", "virtual tokens, a plain table", "prompt_tuning", "PromptTuning", VIRTUAL_TOKENS,
               1e-1, lambda shape, s: s.pre_seq_len * shape.hidden_size),
    MethodSpec("residual_prompt_tuning", "virtual tokens through a residual MLP, P + MLP(P)", "residual_prompt_tuning",
               "ResidualPromptTuning", VIRTUAL_TOKENS, 1e-2, _residual_prompt_encoder,
               encoder_activations=lambda m, s: 2 * s.pre_seq_len * (m.hidden_size + _encoder_width(m, s))),
    MethodSpec("lora", "low-rank updates of the linear layers, through PEFT", "lora", "Lora", WEIGHTS, 1e-3, _lora),
    MethodSpec("full", "every parameter trains", "full", "FullFineTuning", WEIGHTS, 1e-4,
               lambda shape, s: shape.total_parameters, saves_backbone=True, quantizations=(None,)),
)  # fmt: skip
CATALOG: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}


def method_spec(name: str) -> MethodSpec:
    """The entry of method ``name``; ValueError listing the choices for any other name."""
    if name not in CATALOG:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(CATALOG)}")
    return CATALOG[name]


def chosen_method(name: str, settings: Mapping[str, Any]) -> str:
    """The method the settings make of ``name``: one whose ``implies`` they satisfy, served by the same handle
    (``ptuning_v2`` with ``prefix_projection`` on is ``prefix_tuning``)."""
    spec = method_spec(name)
    for other in CATALOG.values():
        same_handle = (other.module, other.handle) == (spec.module, spec.handle)
        if same_handle and other.implies and all(settings.get(k) == v for k, v in other.implies.items()):
            return other.name
    return name
