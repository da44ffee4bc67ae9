"""The prefix's settings and geometry: ``PrefixConfig`` and the ``KVShape`` a model's cache needs.

P-Tuning v2 (``prefix_projection=False``) learns the table directly: ``Embedding(pre_seq_len, kv_size)``.
Prefix-Tuning (``prefix_projection=True``) reparameterises it through a 2-layer MLP,
``Embedding(pre_seq_len, kv_size) -> Linear(kv_size, h) -> Tanh -> Linear(h, kv_size)``, which trains more stably.

``kv_size = num_layers * 2 * num_kv_heads * head_dim``. A row of the table, viewed as
``(2 * num_layers, num_kv_heads, head_dim)``, holds layer i's key in slot ``2i`` and its value in slot ``2i + 1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

PositionConvention = Literal["chatglm", "peft"]


@dataclass
class PrefixConfig:
    """How the prefix is built and fed to the model.

    position_convention: ``"chatglm"`` gives real tokens positions starting at 0, as THUDM's ChatGLM code does (the
    prefix keys carry no rotation), so prefixes trained there reproduce. ``"peft"`` starts them at ``pre_seq_len``,
    as HF PEFT does.
    """

    pre_seq_len: int = 128
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None  # None: the model's hidden size, as in ChatGLM
    prefix_dropout: float = 0.1  # ChatGLM2/3 apply Dropout(0.1) to the prefix
    position_convention: PositionConvention = "chatglm"

    def __post_init__(self) -> None:
        if not isinstance(self.pre_seq_len, int) or self.pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be a positive integer, got {self.pre_seq_len!r}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout!r}")
        if self.position_convention not in ("chatglm", "peft"):
            raise ValueError(
                f"position_convention must be 'chatglm' or 'peft', got {self.position_convention!r}"
            )
        if self.prefix_hidden_size is not None and self.prefix_hidden_size < 1:
            raise ValueError(f"prefix_hidden_size must be positive, got {self.prefix_hidden_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KVShape:
    """The attention geometry a prefix is built for."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_size(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def geometry(self) -> tuple[int, int, int]:
        """What the table's layout depends on (the hidden size only sizes the projection MLP)."""
        return (self.num_layers, self.num_kv_heads, self.head_dim)

    def describe(self) -> str:
        return (
            f"kv_size={self.kv_size} (num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim})"
        )


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


# Where configs keep each quantity, first match wins: ChatGLM's names, Llama-style names, the GPT-2 lineage's
# (`n_layer`/`n_embd`/`n_head`: GPT-2, GPTBigCode, CodeGen, CTRL, Bloom) that lack transformers' aliases.
_NUM_LAYERS = ("num_layers", "num_hidden_layers", "n_layer")
_HIDDEN_SIZE = ("hidden_size", "n_embd", "d_model")
_NUM_HEADS = ("num_attention_heads", "n_head")


def _num_kv_heads(config: Any, num_heads: int) -> int:
    """How many key/value heads the model's cache holds per layer (not how many its weights have)."""
    if getattr(config, "model_type", None) == "chatglm":
        # THUDM's ChatGLM2/3: grouped-query attention is switched on by a flag.
        return config.multi_query_group_num if getattr(config, "multi_query_attention", False) else num_heads
    if getattr(config, "new_decoder_architecture", False):
        # Falcon-40B/180B: `num_kv_heads` groups in the weights, but transformers broadcasts them to every
        # query head before caching, so the cache holds `num_attention_heads`; `multi_query` is ignored.
        return num_heads
    if getattr(config, "multi_query", False):
        # Falcon-7B and GPTBigCode (StarCoder, SantaCoder): one key/value head for all query heads. Neither
        # sets `num_key_value_heads`, and Falcon's `num_kv_heads` only counts without `multi_query`.
        return 1
    # GQA and MQA everywhere else (`num_key_value_heads`); MHA when it is absent.
    return _first(config, "num_key_value_heads", "multi_query_group_num") or num_heads


def _head_dim(config: Any, hidden_size: int, num_heads: int) -> int:
    """The width of a cached key and value per head; refuses models whose keys and values differ in width."""
    if getattr(config, "kv_lora_rank", None) is not None:
        # DeepSeek-V2/V3, MiniCPM3, GLM-4.7-Flash, ...: keys qk_nope_head_dim + qk_rope_head_dim wide,
        # values v_head_dim.
        raise ValueError(
            f"{type(config).__name__} uses multi-head latent attention (kv_lora_rank={config.kv_lora_rank}): "
            "its cached keys and values differ in width, which one (num_kv_heads, head_dim) table cannot hold"
        )
    # An explicit width (Gemma, Qwen3, GLM; ChatGLM's `kv_channels`) need not be hidden_size / heads.
    head_dim = _first(config, "head_dim", "kv_channels") or hidden_size // num_heads
    value_dim = getattr(config, "v_head_dim", None)
    if value_dim is not None and value_dim != head_dim:  # MiMo-V2-Flash
        raise ValueError(
            f"{type(config).__name__} caches keys {head_dim} and values {value_dim} wide per head, which one "
            "(num_kv_heads, head_dim) table cannot hold"
        )
    return head_dim


def _layer_geometry(config: Any, hidden_size: int) -> tuple[int, int]:
    num_heads = _first(config, *_NUM_HEADS)
    if num_heads is None:
        raise ValueError(
            f"cannot read the attention geometry of {type(config).__name__}: it names no attention heads "
            f"({' or '.join(_NUM_HEADS)}); a recurrent or state-space model has no key/value cache for a "
            "prefix"
        )
    return _num_kv_heads(config, num_heads), _head_dim(config, hidden_size, num_heads)


def kv_shape_from_config(config: Any) -> KVShape:
    """The kv geometry the model's cache holds, read from a ChatGLM config or any transformers decoder config.

    Covers MHA, GQA (``num_key_value_heads``), MQA (``multi_query`` in Falcon and GPTBigCode,
    ``num_key_value_heads=1`` elsewhere), explicit head widths (``head_dim``, ``kv_channels``) and the GPT-2
    lineage's ``n_*`` names. Refuses what one table cannot describe: layers of different geometries, keys and
    values of different widths.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    num_layers = _first(config, *_NUM_LAYERS)
    hidden_size = _first(config, *_HIDDEN_SIZE)
    if num_layers is None or hidden_size is None:
        raise ValueError(
            f"cannot read the attention geometry of {type(config).__name__}: need the number of layers "
            f"({' or '.join(_NUM_LAYERS)}) and the hidden size ({' or '.join(_HIDDEN_SIZE)})"
        )
    # Heterogeneous configs (Gemma 4, ...) refuse global reads of per-layer fields: read every layer's.
    layer_configs = config.per_layer_config if getattr(config, "is_heterogeneous", False) else [config]
    geometries = sorted({_layer_geometry(layer, hidden_size) for layer in layer_configs})
    if len(geometries) > 1:
        raise ValueError(
            f"the layers of {type(config).__name__} differ in (num_kv_heads, head_dim): {geometries}; one "
            "prefix table holds a single geometry for every layer"
        )
    num_kv_heads, head_dim = geometries[0]
    return KVShape(num_layers, num_kv_heads, head_dim, hidden_size)
