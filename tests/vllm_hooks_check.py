"""Run by tests/test_vllm.py with .venv-vllm's python: what ``ptuning_v2.vllm_serving.connector`` relies on in
vLLM's experimental connector API, checked by name and signature, so a vLLM upgrade that moves a hook fails here
(with the hook named) instead of serving wrong answers. Prints "hooks ok" when everything holds."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData
from vllm.v1.request import Request

from ptuning_v2.vllm_serving.connector import PrefixTableConnector, kv_head_range, slot_mapping


def parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"vLLM changed: {what}")


expect(
    not PrefixTableConnector.__abstractmethods__,
    f"new abstract hooks {PrefixTableConnector.__abstractmethods__}",
)
hooks = {
    "get_num_new_matched_tokens": ["request", "num_computed_tokens"],
    "update_state_after_alloc": ["request", "blocks", "num_external_tokens"],
    "build_connector_meta": ["scheduler_output"],
    "start_load_kv": ["forward_context", "kwargs"],
    "request_finished": ["request", "block_ids"],
    "__init__": ["vllm_config", "role", "kv_cache_config"],
}
for hook, wanted in hooks.items():
    expect(parameters(getattr(KVConnectorBase_V1, hook)) == wanted, f"KVConnectorBase_V1.{hook} parameters")
new_fields = {f.name for f in dataclasses.fields(NewRequestData)}
expect({"req_id", "block_ids"} <= new_fields, f"NewRequestData fields {new_fields}")
cached_fields = {f.name for f in dataclasses.fields(CachedRequestData)}
expect(
    {"req_ids", "resumed_req_ids", "new_block_ids"} <= cached_fields,
    f"CachedRequestData fields {cached_fields}",
)
request_source = inspect.getsource(Request.__init__)
for attribute in ("self.kv_transfer_params", "self.prompt_token_ids", "self.request_id", "self.cache_salt"):
    expect(attribute in request_source, f"Request has no {attribute}")
update = ["layer", "key", "value", "kv_cache", "slot_mapping"]
expect(parameters(CPUAttentionBackendImpl.do_kv_cache_update) == update, "CPU backend's do_kv_cache_update")
try:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
except ImportError as err:  # CPU-only builds may not import it
    print(f"flash attention backend not importable here ({err}); checked on CPU only")
else:
    expect(
        parameters(FlashAttentionImpl.do_kv_cache_update) == update, "Flash attention's do_kv_cache_update"
    )
expect(extract_layer_index("model.layers.3.self_attn.attn") == 3, "extract_layer_index")

# Tensor-parallel sharding of kv heads, as vLLM's QKVParallelLinear does it: heads split evenly when there are
# at least as many as ranks; else each head is replicated over tp/heads consecutive ranks.
expect(
    [list(kv_head_range(8, 2, r)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]], "8 heads over 2 ranks"
)
expect([list(kv_head_range(2, 4, r)) for r in range(4)] == [[0], [0], [1], [1]], "2 heads over 4 ranks")
expect([list(kv_head_range(2, 8, r)) for r in range(8)] == [[0]] * 4 + [[1]] * 4, "2 heads over 8 ranks")
expect(list(kv_head_range(2, 1, 0)) == [0, 1], "no tensor parallelism")
for bad in ((3, 2), (2, 3)):
    try:
        kv_head_range(bad[0], bad[1], 0)
    except ValueError:
        pass
    else:
        raise SystemExit(f"kv_head_range{bad} should refuse an uneven split")
# P=20 over blocks 7 and 3 of 16 slots: positions 0..15 in block 7, 16..19 in block 3.
slots = slot_mapping([7, 3], 16, 0, 20)
expect(slots.tolist() == [*range(112, 128), *range(48, 52)], "slot mapping")
expect(
    slot_mapping([7, 3], 16, 16, 20).tolist() == list(range(48, 52)), "slot mapping from a cached block on"
)
print("hooks ok", torch.__version__)
