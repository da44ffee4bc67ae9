"""A vLLM KV connector that places prefix tables into the cache slots of a request's placeholder tokens.

Runs inside vLLM (``kv_transfer_config``: ``kv_connector="PrefixTableConnector"``, ``kv_connector_module_path``
this module, ``kv_connector_extra_config={"manifest": PATH}``); it imports only vLLM, torch and ``tables``.
vLLM's connector API is marked experimental: the version is pinned in ``requirements-vllm.txt`` and
``tests/test_vllm.py`` fails when the hooks used here change.

Scheduler side: a request whose ``kv_transfer_params`` name a prefix must start with that prefix's P placeholder
tokens; those P tokens are reported as already computed (less what vLLM's prefix cache already holds, which
is only ever the same prefix's: requests carry the prefix's cache salt). The block ids vLLM allocated for them
travel to the workers in the step's metadata. Worker side: before the forward, every attention layer gets the
table's keys and values written into those slots through its own attention backend's cache-update function,
so the cache layout (CPU, Flash attention, ...) is the backend's business, not ours. Preempted requests come
back through the same path and are loaded again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from .tables import PREFIX_PARAM, Manifest, read_manifest, read_table

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)


def request_prefix(request: Any, manifest: Manifest) -> tuple[str, int] | None:
    """(name, P) of the prefix a request asks for, or None; ValueError when the request is malformed."""
    params = getattr(request, "kv_transfer_params", None) or {}
    name = params.get(PREFIX_PARAM)
    if name is None:
        return None
    entry = manifest.prefix(name)
    if entry is None:
        raise ValueError(f"request {request.request_id}: unknown prefix {name!r}")
    prompt = request.prompt_token_ids or []
    if len(prompt) <= entry.length or any(
        token != manifest.placeholder_id for token in prompt[: entry.length]
    ):
        raise ValueError(
            f"request {request.request_id}: a request for prefix {name!r} must start with {entry.length} "
            f"placeholder tokens ({manifest.placeholder_text!r}) and hold at least one more token"
        )
    return name, entry.length


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The table's kv heads one tensor-parallel rank holds: a contiguous share when there are at least as many
    heads as ranks, else one head replicated over ``tp_size / num_kv_heads`` ranks (vLLM's GQA sharding)."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} kv heads do not split over tensor parallel size {tp_size}")
        share = num_kv_heads // tp_size
        return range(tp_rank * share, (tp_rank + 1) * share)
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor parallel size {tp_size} is not a multiple of {num_kv_heads} kv heads")
    head = tp_rank // (tp_size // num_kv_heads)
    return range(head, head + 1)


def slot_mapping(block_ids: list[int], block_size: int, start: int, stop: int) -> torch.Tensor:
    """Cache slots of token positions ``start..stop-1`` of a request holding ``block_ids``."""
    positions = torch.arange(start, stop)
    blocks = torch.tensor(block_ids, dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


@dataclass
class _Load:
    request_id: str
    prefix: str
    start: int  # first placeholder position not already in vLLM's cache
    stop: int  # P
    block_ids: list[int] = field(default_factory=list)


@dataclass
class PrefixLoadMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)


class PrefixTableConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        path = self._kv_transfer_config.get_from_extra_config("manifest", None)
        if path is None:
            raise ValueError("PrefixTableConnector needs kv_connector_extra_config={'manifest': PATH}")
        self.manifest = read_manifest(path)
        self.folder = Path(path).parent if Path(path).is_file() else Path(path)
        self.block_size = vllm_config.cache_config.block_size
        self._pending: dict[str, _Load] = {}  # scheduler: matched, waiting for blocks
        self._ready: dict[str, _Load] = {}  # scheduler: blocks allocated, to load in this step
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if role == KVConnectorRole.WORKER:
            self._tables = self._load_tables(vllm_config)

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        wanted = request_prefix(request, self.manifest)
        if wanted is None or num_computed_tokens >= wanted[1]:
            return 0, False
        name, length = wanted
        self._pending[request.request_id] = _Load(request.request_id, name, num_computed_tokens, length)
        return length - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        load = self._pending.pop(request.request_id, None)
        if load is not None and num_external_tokens > 0:
            self._ready[request.request_id] = load

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PrefixLoadMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            load = self._ready.pop(new.req_id, None)
            if load is not None:
                load.block_ids = list(new.block_ids[0])
                meta.loads.append(load)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            load = self._ready.pop(req_id, None)
            if load is None:
                continue
            # A request resumed after preemption gets all its block ids again.
            block_ids = cached.new_block_ids[i]
            if req_id not in cached.resumed_req_ids or block_ids is None:
                raise RuntimeError(f"request {req_id}: prefix load scheduled without its blocks")
            load.block_ids = list(block_ids[0])
            meta.loads.append(load)
        if self._ready:  # allocated but not scheduled this step: keep them for the step that schedules them
            logger.debug("prefix loads waiting for a later step: %s", list(self._ready))
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._pending.pop(request.request_id, None)
        self._ready.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side

    def _load_tables(self, vllm_config: VllmConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        heads = kv_head_range(
            self.manifest.num_kv_heads,
            get_tensor_model_parallel_world_size(),
            get_tensor_model_parallel_rank(),
        )
        dtype = vllm_config.model_config.dtype
        tables = {}
        for entry in self.manifest.prefixes:
            keys, values = read_table(self.folder, self.manifest, entry)
            # (layers, heads, P, dim) -> (layers, P, local heads, dim): the token-major rows a cache update takes.
            tables[entry.name] = tuple(
                t[:, heads.start : heads.stop].transpose(1, 2).to(dtype).contiguous() for t in (keys, values)
            )
        return tables

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PrefixLoadMetadata) or not meta.loads:
            return
        for layer_name, layer in forward_context.no_compile_layers.items():
            kv_cache = getattr(layer, "kv_cache", None)
            if not isinstance(kv_cache, torch.Tensor) or not hasattr(layer, "impl"):
                continue
            index = extract_layer_index(layer_name)
            for load in meta.loads:
                keys, values = self._tables[load.prefix]
                slots = slot_mapping(load.block_ids, self.block_size, load.start, load.stop).to(
                    kv_cache.device
                )
                layer.impl.do_kv_cache_update(
                    layer,
                    keys[index, load.start : load.stop].to(kv_cache.device),
                    values[index, load.start : load.stop].to(kv_cache.device),
                    kv_cache,
                    slots,
                )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv writes every layer synchronously

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # prefixes are read-only

    def wait_for_save(self) -> None:
        return
