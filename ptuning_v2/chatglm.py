"""Original THUDM ChatGLM2/3 checkpoints (``model_type: "chatglm"``) -> transformers-native ``GlmForCausalLM``.

The conversion is a pure re-keying plus a row split of the fused QKV projection. Checked against
``transformers/models/glm/modeling_glm.py`` (5.23), nothing needs permuting:

* RoPE: ChatGLM rotates the first ``kv_channels / 2`` dims of each head, pairing ``(x[2j], x[2j+1])`` with
  ``inv_freq = 1 / (10000·rope_ratio) ** (arange(0, d, 2) / d)``, ``d = kv_channels / 2``. ``GlmRotaryEmbedding``
  with ``partial_rotary_factor=0.5`` builds the same ``inv_freq`` over ``d = head_dim / 2``, and
  ``apply_rotary_pos_emb`` repeat-interleaves cos/sin and rotates ``(x[0::2], x[1::2])`` of the first ``d`` dims:
  the same interleaved pairs on the same half.
* MLP: ChatGLM's SwiGLU is ``silu(chunk0) * chunk1`` of ``dense_h_to_4h``; ``GlmMLP`` does
  ``gate, up = chunk(2)`` then ``up * silu(gate)``. Same order, so ``dense_h_to_4h`` becomes ``gate_up_proj`` as is.
* Grouped attention: ChatGLM expands each of the ``multi_query_group_num`` key/value groups to
  ``heads / groups`` consecutive query heads, which is what ``repeat_kv`` does.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

from .files import atomic_directory, read_json_object
from .quantization import prepare_4bit_for_cpu
from .weights import find_weight_files, read_weight_file

PREFIX_ENCODER_KEY = "transformer.prefix_encoder."
_DROPPED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)
_LAYER_KEY = "transformer.encoder.layers."

# ChatGLM2/3's tokenizer ids, used only when the source config does not name them. GlmConfig's own
# defaults are GLM-4's (pad 151329) and would not even fit a 65024-token embedding.
_DEFAULT_PAD_ID = 0
_DEFAULT_EOS_ID = 2

# (field, value the conversion supports): anything else changes the architecture GlmForCausalLM implements.
_SUPPORTED_FLAGS = (
    ("rmsnorm", True),
    ("apply_residual_connection_post_layernorm", False),
    ("post_layer_norm", True),
    ("original_rope", True),
    ("add_bias_linear", False),
)


class ChatGLMConversionError(ValueError):
    """A ChatGLM checkpoint that cannot be converted, with the file/tensor/field at fault in the message."""


# ----------------------------------------------------------------------------------------------- config


def is_chatglm_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory whose config.json says ``model_type: "chatglm"``."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return read_json_object(config_file).get("model_type") == "chatglm"
    except (OSError, ValueError):
        return False


def read_chatglm_config(path: str | os.PathLike) -> dict[str, Any]:
    """The source config.json as a dict; raises unless it is a ChatGLM config (bad JSON names the file)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ChatGLMConversionError(f"{config_file}: no config.json, so this is not a ChatGLM checkpoint")
    config = read_json_object(config_file, ChatGLMConversionError)
    if config.get("model_type") != "chatglm":
        raise ChatGLMConversionError(
            f"{config_file}: model_type is {config.get('model_type')!r}, expected 'chatglm' "
            "(ChatGLM2-6B / ChatGLM3-6B original layout)"
        )
    return config


def _check_supported(config: Mapping[str, Any]) -> None:
    if "position_encoding_2d" in config or "num_layers" not in config:
        raise ChatGLMConversionError(
            "this is a ChatGLM-6B (first generation) config (2-D position encoding, GLM blank-filling layout); "
            "only ChatGLM2-6B / ChatGLM3-6B checkpoints can be converted to GlmForCausalLM"
        )
    for field, supported in _SUPPORTED_FLAGS:
        value = config.get(field, supported)
        if bool(value) != supported:
            raise ChatGLMConversionError(
                f"unsupported ChatGLM variant: config field {field!r} is {value!r}; GlmForCausalLM "
                f"only implements {field}={supported}"
            )
    if config.get("quantization_bit") not in (None, 0):
        raise ChatGLMConversionError(
            f"config field 'quantization_bit' is {config['quantization_bit']!r}: this is a pre-quantised "
            "ChatGLM checkpoint (packed int weights); convert the full-precision checkpoint and quantise on load"
        )


def _kv_groups(config: Mapping[str, Any]) -> int:
    if config.get("multi_query_attention", False):
        return int(config["multi_query_group_num"])
    return int(config["num_attention_heads"])


def chatglm_to_glm_config(chatglm_config: Mapping[str, Any]) -> GlmConfig:
    """Map a ChatGLM2/3 config.json dict onto an equivalent ``GlmConfig``."""
    c = chatglm_config
    _check_supported(c)
    heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    glm_config = GlmConfig(
        vocab_size=int(c["padded_vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(c["ffn_hidden_size"]),
        num_hidden_layers=int(c["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=_kv_groups(c),
        # GlmConfig defaults head_dim to 128 whatever the width, so it must always be given.
        head_dim=int(c.get("kv_channels") or hidden // heads),
        max_position_embeddings=int(c.get("seq_length", 2048)),
        rms_norm_eps=float(c.get("layernorm_epsilon", 1e-5)),
        attention_bias=bool(c.get("add_qkv_bias", False)),
        attention_dropout=float(c.get("attention_dropout", 0.0)),
        rope_parameters={
            "rope_type": "default",
            # ChatGLM3's long-context variants scale the base (rope_ratio 50 for chatglm3-6b-32k).
            "rope_theta": 10000.0 * float(c.get("rope_ratio") or 1.0),
            "partial_rotary_factor": 0.5,
        },
        tie_word_embeddings=False,
        pad_token_id=c.get("pad_token_id", _DEFAULT_PAD_ID),
        eos_token_id=c.get("eos_token_id", _DEFAULT_EOS_ID),
        bos_token_id=c.get("bos_token_id"),
    )
    glm_config.architectures = ["GlmForCausalLM"]
    return glm_config


# ------------------------------------------------------------------------------------------ state dict


def expected_chatglm_shapes(chatglm_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every backbone tensor a ChatGLM2/3 checkpoint with this config must hold, with its shape."""
    c = chatglm_config
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    head_dim = int(c.get("kv_channels") or hidden // heads)
    vocab, ffn = int(c["padded_vocab_size"]), int(c["ffn_hidden_size"])
    qkv_rows = (heads + 2 * _kv_groups(c)) * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (vocab, hidden),
        "transformer.encoder.final_layernorm.weight": (hidden,),
        "transformer.output_layer.weight": (vocab, hidden),
    }
    for i in range(int(c["num_layers"])):
        p = f"{_LAYER_KEY}{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attention.query_key_value.weight"] = (qkv_rows, hidden)
        if c.get("add_qkv_bias", False):
            shapes[p + "self_attention.query_key_value.bias"] = (qkv_rows,)
        shapes[p + "self_attention.dense.weight"] = (hidden, heads * head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * ffn, hidden)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (hidden, ffn)
    return shapes


_GLOBAL_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}


def _split_qkv(tensor: torch.Tensor, config: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """Rows of the fused QKV weight/bias -> (q, k, v), cloned so the pieces do not share storage."""
    heads = int(config["num_attention_heads"])
    head_dim = tensor.shape[0] // (heads + 2 * _kv_groups(config))
    if config.get("multi_query_attention", False):
        groups = _kv_groups(config)
        pieces = tensor.split([heads * head_dim, groups * head_dim, groups * head_dim], dim=0)
    else:
        # Without MQA ChatGLM interleaves per head: rows are [q_h, k_h, v_h] for each head h in turn.
        per_head = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:])
        pieces = tuple(per_head[:, j].reshape(heads * head_dim, *tensor.shape[1:]) for j in range(3))
    return tuple(p.clone() for p in pieces)


def convert_chatglm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    chatglm_config: Mapping[str, Any],
    source: str = "state_dict",
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Convert one shard (or a whole state dict) of an original ChatGLM2/3 checkpoint.

    Returns ``(glm_state_dict, prefix_state_dict)``; the second holds any ``transformer.prefix_encoder.*``
    tensors under their original names. Shapes are checked against ``chatglm_config`` and unknown keys are
    refused; ``source`` (a file name) is quoted in those errors. ``dtype`` casts floating-point backbone tensors.
    """
    expected = expected_chatglm_shapes(chatglm_config)
    converted: dict[str, torch.Tensor] = {}
    prefix: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in state_dict.items():
        if name.startswith(PREFIX_ENCODER_KEY):
            prefix[name] = tensor
            continue
        if name in _DROPPED_KEYS:  # recomputed by GlmRotaryEmbedding
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise ChatGLMConversionError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config implies "
                f"{expected[name]}"
            )
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        converted.update(_convert_key(name, tensor, chatglm_config))
    if unexpected:
        raise ChatGLMConversionError(
            f"{source}: unexpected tensors for a ChatGLM2/3 checkpoint: {unexpected}"
        )
    return converted, prefix


def _convert_key(name: str, tensor: torch.Tensor, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One source tensor (already known to be expected) -> its GLM name(s)."""
    if name in _GLOBAL_RENAMES:
        return {_GLOBAL_RENAMES[name]: tensor}
    layer, rest = name[len(_LAYER_KEY) :].split(".", 1)
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_RENAMES:
        return {prefix + _LAYER_RENAMES[rest]: tensor}
    kind = rest.rsplit(".", 1)[1]  # self_attention.query_key_value.{weight,bias}
    q, k, v = _split_qkv(tensor, config)
    return {f"{prefix}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))}


# ------------------------------------------------------------------------------------- weight files
#
def iter_converted_shards(
    path: str | os.PathLike,
    chatglm_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Yield ``(file, glm_tensors, prefix_tensors)`` shard by shard, then check nothing was missing.

    Only one source shard is alive at a time; the caller should drop each yielded dict once consumed.
    """
    config = chatglm_config if chatglm_config is not None else read_chatglm_config(path)
    expected = set(expected_chatglm_shapes(config))
    files = find_weight_files(path, error=ChatGLMConversionError)
    for file in files:
        source = read_weight_file(file, error=ChatGLMConversionError)
        expected.difference_update(source)
        converted, prefix = convert_chatglm_state_dict(source, config, source=str(file), dtype=dtype)
        del source
        yield file, converted, prefix
        del converted, prefix
        gc.collect()
    if expected:
        raise ChatGLMConversionError(
            f"{Path(path)}: tensors missing from {[f.name for f in files]}: {sorted(expected)}"
        )


# -------------------------------------------------------------------------------------------- loading


def _materialize_rotary(model: GlmForCausalLM) -> None:
    # The model was built on the meta device; its RoPE buffers are not in any checkpoint, so rebuild them.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)


def _load_unquantized(
    path: str | os.PathLike, config: dict[str, Any], dtype: torch.dtype | None
) -> tuple[GlmForCausalLM, dict[str, torch.Tensor]]:
    glm_config = chatglm_to_glm_config(config)
    with torch.device("meta"):
        model = GlmForCausalLM(glm_config)
    prefix: dict[str, torch.Tensor] = {}
    for _file, converted, shard_prefix in iter_converted_shards(path, config, dtype):
        # assign=True adopts the converted tensors instead of copying into freshly allocated parameters.
        model.load_state_dict(converted, strict=False, assign=True)
        prefix.update(shard_prefix)
    _materialize_rotary(model)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # iter_converted_shards checks this already; guards against rename-table drift
        raise ChatGLMConversionError(f"{path}: parameters not loaded: {still_meta}")
    model.config.dtype = model.lm_head.weight.dtype
    model.generation_config = GenerationConfig.from_model_config(model.config)
    return model.eval(), prefix


def load_chatglm_as_glm(
    path: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    quantization_config: Any = None,
    device: str | torch.device | None = None,
    tmp_dir: str | os.PathLike | None = None,
) -> tuple[GlmForCausalLM, dict[str, torch.Tensor] | None]:
    """Load an original ChatGLM2/3 checkpoint as ``GlmForCausalLM``.

    Returns ``(model, prefix_state_dict)``; the second is the checkpoint's ``transformer.prefix_encoder.*``
    tensors under their original names, or None. ``torch_dtype=None`` keeps the stored dtype.

    Without quantisation the model is built on the meta device and adopts the converted tensors shard by
    shard, so peak memory is about one copy of the weights (measured: 1.2x the fp32 size when casting an fp16
    checkpoint to fp32). When no cast is needed, tensors from .bin shards stay memory-mapped (copy-on-write)
    from the source files and are paged in on first use.

    With a bitsandbytes ``quantization_config`` the checkpoint is first written as a native checkpoint under
    ``tmp_dir`` (default: the system temp dir), then loaded with ``from_pretrained``. Cost: one full copy of
    the weights on disk while loading (about 12 GB for a 6B model in fp16) and about one source shard in RAM
    while writing; the directory is deleted afterwards. There ``device`` defaults to the first GPU if there is
    one, else the CPU; without quantisation the model stays on the CPU unless ``device`` is given.
    """
    config = read_chatglm_config(path)
    if quantization_config is None:
        model, prefix = _load_unquantized(path, config, torch_dtype)
        return (model if device is None else model.to(device)), prefix or None
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="chatglm-native-") as native_dir:
        prefix = write_glm_checkpoint(path, native_dir, dtype=torch_dtype)
        if device is None:
            device = 0 if torch.cuda.is_available() else "cpu"
        model = GlmForCausalLM.from_pretrained(
            native_dir,
            quantization_config=quantization_config,
            dtype=torch_dtype or "auto",
            device_map={"": device},
        )
    prepare_4bit_for_cpu(model)  # layers bitsandbytes' AVX512-BF16 CPU kernel cannot take
    return model, prefix or None


# -------------------------------------------------------------------------------------------- writing


def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / '1.5GiB' / 123 -> bytes (decimal units for GB/MB/KB, as transformers uses)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class _ShardWriter:
    """Accumulates tensors into safetensors shards of at most ``max_bytes`` (a lone bigger tensor gets its own).

    Writes into a private directory (see :func:`write_glm_checkpoint`): shards get provisional names until
    :meth:`close` knows how many there are.
    """

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() != size:  # a view: safetensors refuses shared storage
            tensor = tensor.clone()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = self.out_dir / f"part-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(file), metadata={"format": "pt"})
        self.written.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Give shards their final transformers names and write the index when there is more than one."""
        self.flush()
        n = len(self.written)
        if n == 1:
            self.written[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (file, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            file.rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2), encoding="utf-8"
        )


def write_glm_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
) -> dict[str, torch.Tensor]:
    """Stream-convert ``src`` into native sharded safetensors + config.json + generation_config.json.

    Everything is written in a temporary directory beside ``out_dir`` and then moved into ``out_dir`` (created if
    missing; other files in it are kept) file by file, config.json last, so a reader that finds the config finds
    every shard; a failure leaves ``out_dir`` as it was. (``python -m ptuning_v2.convert`` swaps a whole new
    directory in instead.) Memory stays around one source shard plus one output shard. Returns any
    prefix-encoder tensors found in ``src``.
    """
    config = read_chatglm_config(src)
    glm_config = chatglm_to_glm_config(config)
    prefix: dict[str, torch.Tensor] = {}
    with atomic_directory(out_dir, replace=False, last=("config.json",)) as tmp:
        writer = _ShardWriter(tmp, parse_size(max_shard_size))
        stored_dtype = None
        for _file, converted, shard_prefix in iter_converted_shards(src, config, dtype):
            for name in list(converted):
                tensor = converted.pop(name)
                stored_dtype = stored_dtype or (tensor.dtype if tensor.is_floating_point() else None)
                writer.add(name, tensor)
            prefix.update(shard_prefix)
        writer.close()
        glm_config.dtype = dtype or stored_dtype
        glm_config.save_pretrained(tmp)
        GenerationConfig.from_model_config(glm_config).save_pretrained(tmp)
    return prefix
