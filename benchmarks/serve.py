"""The API server under load: 1, 8 and 32 concurrent clients, one prefix and mixed prefixes, batched serving
against a one-request-at-a-time server (MAX_BATCH_SIZE=1) on the same machine, in one run.

    python -m benchmarks.serve                                  # glm-zh-tiny, two random prefixes
    python -m benchmarks.serve --prefixes ner=output/ner-ptuning_v2-64-1e-1,sent=output/sent-...
    python -m benchmarks.serve --quick                          # a smoke test: 1 and 4 clients, 1 request each
    python -m benchmarks.serve --engines native,vllm            # vLLM too (needs bash scripts/setup_vllm.sh)

Each server is started with ``bash scripts/api.sh`` and driven by the official ``openai`` client (one thread per
client, each sending its requests one after another, non-streamed, greedy). Prints a markdown table and writes
it, with the raw numbers, to ``benchmarks/results/serve.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.report import write_report

ROOT = Path(__file__).resolve().parents[1]

FALLBACK_PROMPTS = [
    "找出句中的人名、地名和机构名：李鹏在北京会见了新华社记者。",
    "找出句中的人名、地名和机构名：上海浦东新区今天召开经济工作会议。",
    "请把这句话分词：我爱北京天安门",
    "今天天气怎么样？",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/glm-zh-tiny")
    parser.add_argument(
        "--prefixes",
        default=None,
        help="NAME=PATH,NAME=PATH (the first is the 'one prefix' case); default: two random prefixes "
        "(64 and 16 tokens) written to a temporary directory",
    )
    parser.add_argument(
        "--engines", default="native", help="native, vllm or both (comma-separated): api.sh's ENGINE settings"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests_per_client", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--prompts", default="data/ner/dev.json", help="JSON lines with 'content'")
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 1 request each, 8 tokens")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/serve (--quick: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests_per_client, args.max_tokens = [1, 4], 1, 8
    if args.out is None:  # a smoke test does not overwrite the quoted results
        args.out = (
            str(Path(tempfile.gettempdir()) / "serve_quick") if args.quick else "benchmarks/results/serve"
        )
    return args


def random_prefixes(model: str, directory: Path) -> str:
    """Two random P-Tuning v2 tables (64 and 16 tokens) for the backbone: throughput does not depend on what a
    prefix learned, only on its length."""
    import torch

    from ptuning_v2 import PrefixConfig, attach_prefix, load_model

    specs = []
    for name, length, seed in (("rand64", 64, 1), ("rand16", 16, 2)):
        backbone = load_model(model)
        attach_prefix(backbone, PrefixConfig(pre_seq_len=length))
        torch.manual_seed(seed)
        torch.nn.init.normal_(backbone.tuning.encoder.embedding.weight, std=0.5)
        backbone.tuning.save(directory / name)
        specs.append(f"{name}={directory / name}")
    return ",".join(specs)


def load_prompts(path: str, count: int) -> list[str]:
    file = ROOT / path
    if not file.is_file():
        return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(count)]
    rows = [
        json.loads(line)["content"] for line in file.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return [rows[i % len(rows)] for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``bash scripts/api.sh`` in a subprocess, ready to answer."""

    def __init__(self, model: str, prefixes: str, max_batch_size: int, engine: str = "native") -> None:
        import openai

        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        settings = [
            f"ENGINE={engine}",
            f"MODEL={model}",
            f"PREFIXES={prefixes}",
            f"PORT={self.port}",
            f"MAX_BATCH_SIZE={max_batch_size}",
        ]
        quiet = ["--uvicorn-log-level", "warning"] if engine == "vllm" else ["--log_level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU backend wants it said
        self.process = subprocess.Popen(
            ["bash", "scripts/api.sh", *settings, *quiet],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}/v1"
        client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                return
            except openai.APIConnectionError as err:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = Path(self.log.name).read_text()[-3000:]
                    self.stop()
                    raise RuntimeError(f"the server did not start:\n{log}") from err
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()
        os.unlink(self.log.name)


def run_load(url: str, jobs: list[list[tuple[str, str]]], max_tokens: int) -> dict:
    """Each client (a list of (prompt, model) jobs) sends its requests one after another; all clients at once."""
    import openai

    def client(own_jobs: list[tuple[str, str]]) -> list[tuple[float, int, str]]:
        api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        results = []
        for prompt, model in own_jobs:
            start = time.perf_counter()
            reply = api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
            )
            # vLLM keeps the "\n " the model writes after <|assistant|>; the native engine drops it.
            answer = reply.choices[0].message.content.strip()
            results.append((time.perf_counter() - start, reply.usage.completion_tokens, answer))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        per_client = list(pool.map(client, jobs))
    seconds = time.perf_counter() - start
    flat = [r for results in per_client for r in results]
    latencies = sorted(r[0] for r in flat)
    return {
        "requests": len(flat),
        "seconds": round(seconds, 3),
        "requests_per_second": round(len(flat) / seconds, 3),
        "tokens_per_second": round(sum(r[1] for r in flat) / seconds, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        "answers": [r[2] for r in flat],
    }


def main() -> None:
    args = parse_args()
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        source = "given checkpoints"
        prefixes = args.prefixes
        if prefixes is None:
            prefixes, source = random_prefixes(args.model, Path(tmp)), "random prefixes of 64 and 16 tokens"
        names = [entry.split("=", 1)[0] for entry in prefixes.split(",")]
        backbone = Path(args.model).name
        scenarios = {"one prefix": [names[0]], "mixed": [*names, backbone]}
        rows = []
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        servers = [("batched", args.max_batch_size, "native"), ("one at a time", 1, "native")]
        if "native" not in engines:
            servers = servers[1:]  # the one-at-a-time server stays: it is every row's reference
        if "vllm" in engines:
            servers.append(("vllm", args.max_batch_size, "vllm"))
        for label, max_batch_size, engine in servers:
            server = Server(args.model, prefixes, max_batch_size, engine)
            try:
                run_load(server.url, [[(FALLBACK_PROMPTS[0], names[0])]], args.max_tokens)  # warm-up
                for scenario, models in scenarios.items():
                    for clients in args.clients:
                        count = clients * args.requests_per_client
                        prompts = load_prompts(args.prompts, count)
                        jobs = [
                            [
                                (prompts[c * args.requests_per_client + r], models[(c + r) % len(models)])
                                for r in range(args.requests_per_client)
                            ]
                            for c in range(clients)
                        ]
                        result = run_load(server.url, jobs, args.max_tokens)
                        rows.append(
                            {
                                "server": label,
                                "max_batch_size": max_batch_size,
                                "prefixes": scenario,
                                "clients": clients,
                                **result,
                            }
                        )
                        print(json.dumps({k: v for k, v in rows[-1].items() if k != "answers"}), flush=True)
            finally:
                server.stop()

    reference = {(r["prefixes"], r["clients"]): r for r in rows if r["server"] == "one at a time"}
    table = [
        "| server | prefixes | clients | requests | requests/s | generated tokens/s | p50 latency (s) | "
        "p95 latency (s) | speed-up vs one at a time | answers identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(
        rows,
        key=lambda r: (
            r["prefixes"] != "one prefix",
            r["clients"],
            ["batched", "vllm", "one at a time"].index(r["server"]),
        ),
    ):
        base = reference[row["prefixes"], row["clients"]]
        same = sum(a == b for a, b in zip(row["answers"], base["answers"]))
        table.append(
            f"| {row['server']} | {row['prefixes']} | {row['clients']} | {row['requests']} | "
            f"{row['requests_per_second']:.2f} | {row['tokens_per_second']:.1f} | {row['p50_s']:.2f} | "
            f"{row['p95_s']:.2f} | {row['requests_per_second'] / base['requests_per_second']:.1f}x | "
            f"{same}/{row['requests']} |"
        )
    settings = (
        f"{args.model} with {source} ({', '.join(names)}; 'mixed' rotates them and the bare backbone), "
        f"greedy, max_tokens={args.max_tokens}, {args.requests_per_client} requests per client, "
        f"{os.cpu_count()} CPUs shared by server and clients; "
        f"servers: `bash scripts/api.sh MODEL=... PREFIXES=... MAX_BATCH_SIZE={args.max_batch_size}` (batched), "
        f"`MAX_BATCH_SIZE=1` (one at a time) and `ENGINE=vllm` (vllm, vllm-cpu 0.32.0, its defaults); command: `python -m benchmarks.serve {' '.join(sys.argv[1:])}`"
    )
    write_report(args.out, table, settings, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
