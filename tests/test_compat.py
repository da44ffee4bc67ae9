"""The transformers internals we lean on, checked by name and signature.

Each item is used where no public API does the job (the comment at the use says why). scripts/check_compat.sh runs
this file against the newest releases, so a rename upstream fails here, with its name, before it fails in a run.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
import transformers.trainer
import transformers.trainer_utils
from tiny_models import random_ids, tiny_model
from transformers import Trainer
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from ptuning_v2.compat import CACHE_NAMES, cache_argument, output_cache
from ptuning_v2.methods.prefix.hook import ReadOnlyPrefixLayer


def _parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        # ptuning_v2.train.TuningTrainer overrides these to write prefix-only, atomic checkpoints.
        ("_save_checkpoint", ["model", "trial"]),
        ("_save_optimizer_and_scheduler", ["output_dir"]),
        ("_load_from_checkpoint", ["resume_from_checkpoint", "model"]),
    ],
)
def test_private_trainer_methods_we_override_keep_their_signature(method, expected):
    assert hasattr(Trainer, method), f"transformers {transformers.__version__}: Trainer.{method} is gone"
    assert _parameters(getattr(Trainer, method)) == expected


def test_trainer_reads_deepspeed_load_checkpoint_from_its_module():
    # TuningTrainer swaps it for a non-strict load (our DeepSpeed checkpoints leave out the frozen backbone).
    assert callable(transformers.trainer.deepspeed_load_checkpoint)
    source = inspect.getsource(Trainer)
    assert "deepspeed_load_checkpoint(" in source


def test_quantized_training_guard_reads_the_peft_flag():
    # TuningTrainer sets _hf_peft_config_loaded while the Trainer checks a quantized model: the prefix is the adapter.
    assert "_hf_peft_config_loaded" in inspect.getsource(transformers.trainer_utils)


def test_checkpointed_layers_can_keep_a_read_only_cache():
    # attach_prefix sets this on decoder layers; without it, checkpointing drops the prefix cache in training.
    assert hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
    model = tiny_model("glm")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    # attach._check_checkpointing reads use_reentrant from the partial the layer holds.
    assert layer._gradient_checkpointing_func.keywords.get("use_reentrant") is False


def test_cache_layers_can_be_built_from_tensors():
    # ReadOnlyPrefixLayer subclasses DynamicLayer and sets its fields; Cache(layers=...) assembles them.
    keys = torch.randn(2, 1, 3, 8)
    cache = Cache(layers=[ReadOnlyPrefixLayer(keys, keys.clone()), ReadOnlyPrefixLayer(keys, keys.clone())])
    assert isinstance(cache.layers[0], DynamicLayer)
    assert cache.get_seq_length() == 3
    new_keys, _ = cache.update(torch.ones(2, 1, 1, 8), torch.ones(2, 1, 1, 8), 0)
    assert new_keys.shape == (2, 1, 4, 8) and cache.get_seq_length() == 3  # read, never grown


def test_cache_keyword_and_output_field():
    model = tiny_model("glm")
    name = cache_argument(model)
    assert name in CACHE_NAMES
    with torch.no_grad():
        out = model(input_ids=random_ids(1, 4), use_cache=True)
    assert isinstance(output_cache(out), Cache)


def test_bitsandbytes_cpu_packing_internals():
    # ptuning_v2.quantization steers bitsandbytes' AVX512-BF16 CPU path per layer; no public switch exists.
    import bitsandbytes.functional
    import bitsandbytes.nn.modules
    from bitsandbytes.nn import Linear4bit

    assert callable(bitsandbytes.nn.modules.has_avx512bf16)
    assert callable(bitsandbytes.functional._convert_weight_packed_for_cpu_inverse)
    layer = Linear4bit(64, 32, bias=False, quant_type="nf4")
    assert hasattr(layer, "support_avx512bf16_for_cpu")
    assert "packing_format_for_cpu" in inspect.getsource(bitsandbytes.functional)
