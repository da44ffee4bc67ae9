"""Run by tests/test_vllm.py with .venv-vllm's python: greedy answers of vLLM's offline engine, with the prefix
connector, for requests given as token ids. Usage: vllm_offline_answers.py MANIFEST_DIR REQUESTS_JSON OUT_JSON,
where REQUESTS_JSON is a list of {"prefix": name or null, "prompt_ids": [...], "max_tokens": n}."""

from __future__ import annotations

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from ptuning_v2.vllm_serving.tables import PREFIX_PARAM, read_manifest

if __name__ == "__main__":  # vLLM spawns its engine process, which imports this file again
    folder, requests_file, out_file = sys.argv[1:4]
    manifest = read_manifest(folder)
    llm = LLM(
        model=manifest.model,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        enable_prefix_caching=True,
        kv_transfer_config={
            "kv_connector": "PrefixTableConnector",
            "kv_connector_module_path": "ptuning_v2.vllm_serving.connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"manifest": f"{folder}/manifest.json"},
        },
    )
    prompts, params = [], []
    for request in json.load(open(requests_file)):
        entry = manifest.prefix(request["prefix"]) if request["prefix"] else None
        if entry is None:
            prompts.append(TokensPrompt(prompt_token_ids=request["prompt_ids"]))
            params.append(SamplingParams(temperature=0, max_tokens=request["max_tokens"]))
        else:
            ids = [manifest.placeholder_id] * entry.length + request["prompt_ids"]
            prompts.append(TokensPrompt(prompt_token_ids=ids, cache_salt=entry.cache_salt))
            transfer = {"kv_transfer_params": {PREFIX_PARAM: entry.name}}
            params.append(
                SamplingParams(temperature=0, max_tokens=request["max_tokens"], extra_args=transfer)
            )
    outputs = llm.generate(prompts, params, use_tqdm=False)  # all in one batch
    json.dump([list(output.outputs[0].token_ids) for output in outputs], open(out_file, "w"))
