"""bitsandbytes 4-bit on both kinds of CPU: with AVX512-BF16 (packed kernel) and without (generic path).

bitsandbytes picks the path per layer when it builds a ``Linear4bit``, from ``bitsandbytes.nn.modules.has_avx512bf16``;
``force_cpu_path`` patches that name, so both paths' decisions run on any machine. The packed kernel itself
(``gemv_4bit`` for the CPU) is only registered when the real CPU has the instructions, so there the forward on
packed weights is checked too; elsewhere the packed test checks the repacking and skips the forward.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_ids, tiny_model

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402
import bitsandbytes.nn.modules as bnb_modules  # noqa: E402

from ptuning_v2 import (  # noqa: E402
    load_model,  # noqa: E402
    plan,
    quantization,
)
from ptuning_v2.methods import attach_prefix  # noqa: E402
from ptuning_v2.methods.prefix import PrefixConfig  # noqa: E402
from ptuning_v2.quantization import cpu_bf16_flags, prepare_4bit_for_cpu  # noqa: E402

CPU_PATHS = ["packed", "generic"]
# The compute dtype a quantised backbone gets by default: bf16 on CPUs with AVX512-BF16/AMX, fp32 elsewhere
# (``cpu_compute_dtype``); both are run on any machine (bf16 is emulated, slower, where the CPU lacks it).
COMPUTE_DTYPES = ["fp32", "bf16"]
# Whether this CPU really has the packed kernel (bitsandbytes registers it at import time from this check).
PACKED_KERNEL_HERE = bool(bnb_functional.has_avx512bf16())


def force_cpu_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make the Linear4bit layers built from now on take bitsandbytes' packed (AVX512-BF16) or generic CPU path."""
    assert path in CPU_PATHS
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: path == "packed")


def check_packed_forward_possible(model: torch.nn.Module, path: str) -> None:
    """On the packed path, every layer left on it must repack as bitsandbytes' forward will; skip the forward
    itself where this CPU has no packed kernel."""
    if path != "packed":
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.support_avx512bf16_for_cpu:
            bnb_functional._convert_weight_packed_for_cpu(
                module.weight.data.clone(), copy.deepcopy(module.weight.quant_state)
            )
    if not PACKED_KERNEL_HERE:
        pytest.skip("repacking checked; the packed forward needs a CPU with AVX512-BF16")


# hidden 64, q 4x24=96, kv 2x24=48, ffn 96: q_proj and gate_up_proj fit the packed kernel; k_proj and v_proj
# do not (out_features 48), nor o_proj and down_proj (in_features 96).
ODD_SHAPES = dict(
    hidden_size=64, num_attention_heads=4, head_dim=24, num_key_value_heads=2, intermediate_size=96
)


# Every Linear fits the packed kernel (in_features 64 or 128, out_features multiples of 32).
FITTING_SHAPES = dict(
    hidden_size=64, num_attention_heads=4, head_dim=16, num_key_value_heads=2, intermediate_size=128
)


def saved_model(tmp_path_factory, shapes: dict) -> str:
    directory = tmp_path_factory.mktemp("int4")
    tiny_model("glm", **shapes).save_pretrained(directory)
    return str(directory)


def packed_layers(model: torch.nn.Module) -> set[str]:
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    }


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("path", CPU_PATHS)
def test_int4_runs_layers_the_packed_kernel_cannot_take(path, dtype, tmp_path_factory, monkeypatch, caplog):
    force_cpu_path(monkeypatch, path)
    with caplog.at_level(logging.WARNING, logger="ptuning_v2.quantization"):
        model = load_model(saved_model(tmp_path_factory, ODD_SHAPES), quantization_bit=4, torch_dtype=dtype)
    check_packed_forward_possible(model, path)
    reference = tiny_model("glm", **ODD_SHAPES)
    ids = random_ids(2, 12)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    assert (
        torch.isfinite(logits).all()
        and logits.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    )
    # nf4 weights (4 bits: a relative error near 10% per weight) dominate; bf16's 8-bit mantissa adds ~0.4% per
    # operation, so the logits point the same way as the fp32 model's in either dtype.
    assert F.cosine_similarity(logits.flatten().double(), expected.flatten().double(), dim=0) > 0.9

    misfits = {
        name
        for name, m in reference.named_modules()
        if type(m) is torch.nn.Linear and name != "lm_head" and (m.in_features % 64 or m.out_features % 32)
    }
    assert {n.rsplit(".", 1)[-1] for n in misfits} == {"k_proj", "v_proj", "o_proj", "down_proj"}
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert misfits < quantized  # they stay 4-bit, whichever path
    ours = " ".join(r.getMessage() for r in caplog.records if r.name == "ptuning_v2.quantization")
    if path == "packed":
        assert packed_layers(model) == quantized - misfits
        assert all(name in ours for name in misfits)  # the log line names the layers on the generic path
        assert prepare_4bit_for_cpu(model) == []  # idempotent: nothing left to switch
    else:
        assert packed_layers(model) == set() and not ours


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("path", CPU_PATHS)
def test_int4_prefix_still_learns_after_an_evaluation(path, dtype, tmp_path_factory, monkeypatch):
    # The packed kernel has no backward: once an evaluation has packed the weights, training must unpack them,
    # or backward through a packed layer with a bias fails in place and one without passes no gradient on.
    force_cpu_path(monkeypatch, path)
    model = load_model(saved_model(tmp_path_factory, FITTING_SHAPES), quantization_bit=4, torch_dtype=dtype)
    attach_prefix(model, PrefixConfig(pre_seq_len=4, prefix_projection=False, prefix_dropout=0.0))
    check_packed_forward_possible(model, path)
    ids = random_ids(2, 10)

    def prefix_grad() -> torch.Tensor:
        model.train()
        model.tuning.encoder.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return model.tuning.encoder.embedding.weight.grad.clone()

    before = prefix_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert bool(packed_layers(model)) == (path == "packed")
    after = prefix_grad()
    # Layers whose input needs no gradient (layer 0's q/k/v) stay packed and compute in bf16: close, not equal.
    assert before.abs().sum() > 0
    assert F.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("flags", [("avx512_bf16",), ("amx_bf16",), ()])
def test_a_quantized_backbone_computes_in_bf16_where_the_cpu_does(
    flags, tmp_path_factory, monkeypatch, capsys
):
    monkeypatch.setattr(quantization, "cpu_bf16_flags", lambda: flags)
    path = saved_model(tmp_path_factory, FITTING_SHAPES)
    expected = torch.bfloat16 if flags else torch.float32
    for bits in (4, 8):
        model = load_model(path, quantization_bit=bits)
        assert model.get_input_embeddings().weight.dtype == expected, bits
        note = capsys.readouterr().err
        if flags:
            assert f"bf16 compute (this CPU has {flags[0].upper()})" in note
        else:
            assert "fp32 compute (this CPU has none of AVX512_BF16/AMX_BF16)" in note
    # an unquantised backbone stays fp32; an explicit dtype wins, without a note
    assert load_model(path).get_input_embeddings().weight.dtype == torch.float32
    model = load_model(path, quantization_bit=4, torch_dtype="fp32")
    assert (
        model.get_input_embeddings().weight.dtype == torch.float32 and "note" not in capsys.readouterr().err
    )
    # the planner plans what the trainer will load
    assert plan.main(
        ["--model_name_or_path", path, "--quantization_bit", "4", "--device", "cpu", "--json"]
    ) in (0, None)
    planned = json.loads(capsys.readouterr().out)["settings"]["torch_dtype"]
    assert planned == ("bf16" if flags else "fp32")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
    )
    sapphire = tmp_path / "amx"
    sapphire.write_text("flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_bf16_flags(str(avx2)) == ()
    assert cpu_bf16_flags(str(sapphire)) == ("avx512_bf16", "amx_bf16")
    assert cpu_bf16_flags(str(tmp_path / "missing")) == ()  # not Linux: no flags, fp32
