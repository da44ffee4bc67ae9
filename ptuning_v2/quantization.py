"""bitsandbytes 4-bit layers on CPUs with AVX512-BF16 (and AMX), where bitsandbytes repacks weights for its kernel.

bitsandbytes 0.50.2 decides per layer, in ``Linear4bit.__init__``, whether this CPU can use its packed kernel:
``self.support_avx512bf16_for_cpu = has_avx512bf16()`` (the name ``bitsandbytes.nn.modules.has_avx512bf16``).
``Linear4bit.forward`` then repacks the weight (``_convert_weight_packed_for_cpu``) the first time it runs with

    x.device.type == "cpu" and self.support_avx512bf16_for_cpu and not self.training
    and not x.requires_grad and the weight is not packed yet

and from then on every forward on the CPU goes through ``gemv_4bit`` on the packed weight (bf16 compute), whatever
the quant type (nf4 or fp4), double quantisation or compute dtype. The repacking needs

    in_features  % blocksize == 0   (blocksize 64 by default: absmax is reshaped to [out, in // blocksize])
    out_features % 32 == 0          (``block_n=32``: ``assert N % block_n == 0``)

otherwise ``RuntimeError: shape '[N, k]' is invalid`` or ``AssertionError: N must be divisible by block_n``. CPUs
without AVX512-BF16 never repack and have no such limit; neither do CUDA inputs.

Two more facts, measured: ``gemv_4bit`` has no autograd formula, so once a layer is packed (any evaluation under
``no_grad``), backpropagating through it gives its input no gradient (silently, or an in-place error when it has a
bias), which would stop a prefix from learning after a mid-training evaluation; and ``Linear8bitLt`` has no such
shape limit on these CPUs.

``prepare_4bit_for_cpu`` handles both: layers the packed kernel cannot take keep their 4-bit weights but use the
generic CPU path (dequantise + matmul), and a packed layer is unpacked again when a forward needs its input's
gradient (bitsandbytes repacks it at the next evaluation forward).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The CPU flags (Linux /proc/cpuinfo) under which bf16 matmuls run natively: oneDNN's AVX512-BF16 and AMX kernels.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """Which of ``BF16_CPU_FLAGS`` this CPU has (none where /proc/cpuinfo cannot be read: not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)


def cpu_compute_dtype(quantized: bool) -> str:
    """The compute dtype ("bf16" or "fp32") on this CPU when none is asked for: fp32, except a 4/8-bit backbone on
    a CPU that computes bf16 natively (measured on an AVX512-BF16 CPU with a 300M GLM: 0.40x the fp32 peak training
    memory, 2.6-2.8x faster steps); bf16 emulated on AVX2 is slower than fp32. The trainer and the planner ask here."""
    return "bf16" if quantized and cpu_bf16_flags() else "fp32"


def compute_dtype_note() -> str:
    """The line that says which compute dtype a quantised backbone gets on this CPU by default, and why."""
    name = cpu_compute_dtype(quantized=True)
    if name == "bf16":
        why = f"this CPU has {'/'.join(cpu_bf16_flags()).upper()}"
    else:
        why = f"this CPU has none of {'/'.join(BF16_CPU_FLAGS).upper()}"
    return f"quantized backbone on CPU: {name} compute ({why}); --torch_dtype (TORCH_DTYPE=) sets another"


# bitsandbytes.functional._convert_weight_packed_for_cpu(..., block_n=32): output features per packed tile.
PACKED_BLOCK_N = 32
_HOOKED = "_ptuning_v2_unpacks_for_grad"


def packed_cpu_kernel_fits(module: nn.Module) -> bool:
    """Whether bitsandbytes' AVX512-BF16 CPU kernel can repack this ``Linear4bit``'s weight."""
    state = getattr(module.weight, "quant_state", None)
    blocksize = getattr(state, "blocksize", None) or getattr(module.weight, "blocksize", None) or 64
    return module.in_features % blocksize == 0 and module.out_features % PACKED_BLOCK_N == 0


def _is_packed(module: nn.Module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


def _unpack_when_grad_needed(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # The packed kernel has no backward: give autograd the generic layout before bitsandbytes' forward runs.
    x = args[0] if args else kwargs.get("x")
    if torch.is_tensor(x) and x.requires_grad and torch.is_grad_enabled():
        if _is_packed(module):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state
            )


def prepare_4bit_for_cpu(model: nn.Module) -> list[str]:
    """Make a bitsandbytes 4-bit model run on CPUs with and without AVX512-BF16; returns the names of the layers
    switched to the generic CPU path (empty where bitsandbytes does not pick the packed kernel).

    Only layers that would take the packed path (``support_avx512bf16_for_cpu`` true, which is what bitsandbytes'
    forward consults) are touched, so on CPUs without AVX512-BF16 this does nothing; on a GPU the changes are
    inert (bitsandbytes packs only for CPU inputs). Layers that fit keep the packed kernel: on 2 cores it ran a
    4096x4096 nf4 layer 3.5x (64 tokens) to 7x (1 token) faster than the generic path. Idempotent.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    generic: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        if not packed_cpu_kernel_fits(module):
            module.support_avx512bf16_for_cpu = False
            generic.append(name)
        elif not getattr(module, _HOOKED, False):
            module.register_forward_pre_hook(_unpack_when_grad_needed, with_kwargs=True)
            setattr(module, _HOOKED, True)
    if generic:
        logger.warning(
            "bitsandbytes' AVX512-BF16 CPU kernel needs in_features divisible by the 4-bit block size (64) and "
            "out_features by %d; %d 4-bit layer(s) stay 4-bit on the generic (slower) CPU path instead: %s",
            PACKED_BLOCK_N,
            len(generic),
            ", ".join(generic),
        )
    return generic
