"""The prefixes the engine serves: each checkpoint's key/value table, computed once at load, through its method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import CheckpointRecord
from ..methods import METHODS, method_class
from ..methods.catalog import KV_PREFIX


@dataclass
class PrefixTable:
    """One loaded prefix: per layer, keys and values ``(num_kv_heads, pre_seq_len, head_dim)``."""

    name: str
    path: str
    source: str  # the checkpoint's format: "ptuning_v2", "chatglm" or "peft"
    position_convention: str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


def load_prefix_table(
    name: str, record: CheckpointRecord, dtype: torch.dtype, device: torch.device, backbone: nn.Module
) -> PrefixTable:
    """The table of a checkpoint whose method acts as a key/value prefix at inference, from its method.

    A prefix method's table is what it holds (a projection MLP is run once); virtual tokens are run through the
    backbone once (attention is causal, so their keys and values are all later tokens see of them) and serve as a
    prefix whose real tokens start at position P. ValueError naming the checkpoint when it does not fit.
    """
    spec = METHODS[record.method]
    if not spec.shares_backbone:
        raise ValueError(
            f"prefix {name!r}: {record.path} is a {record.method} checkpoint, which changes the backbone's weights; "
            "it cannot share a backbone with other checkpoints. Serve it alone (its only checkpoint), or as the "
            "--model"
        )
    try:
        pairs = method_class(record.method).checkpoint_table(backbone, record)
    except (TypeError, ValueError) as err:
        raise ValueError(f"prefix {name!r}: {err}") from err
    # A prefix keeps the position convention it was trained with; virtual tokens hold positions 0..P-1.
    convention = record.config.position_convention if spec.kind == KV_PREFIX else "peft"
    return PrefixTable(
        name=name,
        path=str(record.path),
        source=record.source,
        position_convention=convention,
        keys=[k.to(device=device, dtype=dtype).contiguous() for k, _ in pairs],
        values=[v.to(device=device, dtype=dtype).contiguous() for _, v in pairs],
    )
