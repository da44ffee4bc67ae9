"""Batched left-padded generation and the evaluation script, on a tiny model with a prefix."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_backbone

from ptuning_v2 import PrefixConfig, attach_prefix, load_model, load_tokenizer
from ptuning_v2.generation import GenerationSettings, generate_texts, write_predictions

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "北京天气怎么样",
    "上海",
    "请把这句话分词：我爱北京天安门",
    "好",
    "人民日报记者报道",
    "今天是一个晴朗的好日子",
]


@pytest.fixture(scope="module")
def prefixed_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    save_tiny_backbone(root / "model", TEXTS + ["人名地名机构名无：；、"], initializer_range=0.3)
    model = load_model(str(root / "model"))
    attach_prefix(model, PrefixConfig(pre_seq_len=6, prefix_projection=True, prefix_dropout=0.0))
    torch.manual_seed(3)
    for param in model.tuning.encoder.parameters():
        torch.nn.init.normal_(param, std=0.3)
    model.tuning.save(root / "prefix")
    return root


def prompts_of(tokenizer, n: int) -> list[list[int]]:
    """Mixed lengths, from 1 to 40 tokens."""
    prompts = []
    for i in range(n):
        text = (TEXTS[i % len(TEXTS)] * (1 + i % 4))[: 1 + (i * 7) % 40]
        messages = [{"role": "user", "content": text}]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return prompts


def test_batch_of_16_generates_exactly_what_batch_1_does(prefixed_dir):
    tokenizer = load_tokenizer(str(prefixed_dir / "model"))
    model = load_model(str(prefixed_dir / "model"), ptuning_checkpoint=str(prefixed_dir / "prefix"))
    prompts = prompts_of(tokenizer, 20)
    assert len({len(p) for p in prompts}) > 8
    settings = GenerationSettings(max_new_tokens=12)
    batched, speed = generate_texts(
        model, tokenizer, prompts, GenerationSettings(max_new_tokens=12), batch_size=16
    )
    single, _ = generate_texts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12), batch_size=1)
    assert batched == single
    assert any(batched) and speed["examples"] == 20 and speed["new_tokens_per_second"] > 0
    # and the same tokens as calling generate on each prompt alone
    first = model.generate(input_ids=torch.tensor([prompts[5]]), max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(first[0, len(prompts[5]) :], skip_special_tokens=True).strip() == batched[5] or (
        tokenizer.eos_token_id in first[0].tolist()
    )
    assert settings.do_sample is False


def test_prefix_is_computed_once_per_batch(prefixed_dir):
    tokenizer = load_tokenizer(str(prefixed_dir / "model"))
    model = load_model(str(prefixed_dir / "model"), ptuning_checkpoint=str(prefixed_dir / "prefix"))
    calls = []
    model.tuning.encoder.register_forward_hook(lambda *_: calls.append(1))
    generate_texts(
        model, tokenizer, prompts_of(tokenizer, 10), GenerationSettings(max_new_tokens=8), batch_size=4
    )
    assert len(calls) == 3  # ceil(10 / 4) batches, however many tokens each generates


def test_sampling_follows_the_seed(prefixed_dir):
    tokenizer = load_tokenizer(str(prefixed_dir / "model"))
    model = load_model(str(prefixed_dir / "model"), ptuning_checkpoint=str(prefixed_dir / "prefix"))
    prompts = prompts_of(tokenizer, 6)
    sample = GenerationSettings(max_new_tokens=10, do_sample=True)
    first, _ = generate_texts(model, tokenizer, prompts, sample, batch_size=3, seed=1)
    again, _ = generate_texts(model, tokenizer, prompts, sample, batch_size=3, seed=1)
    assert first == again


def test_predictions_file_is_the_official_format(tmp_path):
    path = write_predictions(tmp_path / "generated_predictions.txt", ["a", "乙"], ["x", "甲"])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"labels": "x", "predict": "a"}, {"labels": "甲", "predict": "乙"}]


def test_evaluate_script_end_to_end(prefixed_dir, tmp_path):
    test_file = tmp_path / "test.json"
    rows = [{"content": t, "summary": "地名：北京"} for t in TEXTS]
    test_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "eval"
    settings = [
        f"MODEL={prefixed_dir / 'model'}",
        f"CHECKPOINT={prefixed_dir / 'prefix'}",
        f"TEST_FILE={test_file}",
        f"OUTPUT_DIR={out}",
        "BATCH_SIZE=4",
        "MAX_NEW_TOKENS=8",
    ]
    result = subprocess.run(
        ["bash", "scripts/evaluate.sh", *settings],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((out / "generated_predictions.txt").read_text().splitlines()) == len(TEXTS)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "entity-f1"} <= set(summary)
    assert json.loads((out / "generation_speed.json").read_text())["examples"] == len(TEXTS)


def test_chat_answers_a_query_with_the_prefix(prefixed_dir, capsys):
    from ptuning_v2.chat import main as chat_main
    from ptuning_v2.data import generation_prompt_ids

    args = ["--model", str(prefixed_dir / "model"), "--checkpoint", str(prefixed_dir / "prefix")]
    chat_main([*args, "--query", "北京天气怎么样", "--max_new_tokens", "8"])
    answer = capsys.readouterr().out.strip()
    # the same answer as batched evaluation gives for the same prompt
    tokenizer = load_tokenizer(str(prefixed_dir / "model"))
    model = load_model(str(prefixed_dir / "model"), ptuning_checkpoint=str(prefixed_dir / "prefix"))
    prompt = generation_prompt_ids([{"role": "user", "content": "北京天气怎么样"}], tokenizer)
    expected, _ = generate_texts(
        model, tokenizer, [prompt], GenerationSettings(max_new_tokens=8), progress=False
    )
    assert answer == expected[0]


def test_growing_cache_layers_generate_what_concatenation_does(prefixed_dir, monkeypatch):
    """Behind a prefix, generate's cache layers write into spare room (kv_cache.GrowingLayer) instead of
    re-concatenating; greedy and beam search give the same tokens as plain DynamicLayers."""
    import ptuning_v2.methods.prefix.hook as hook

    tokenizer = load_tokenizer(str(prefixed_dir / "model"))
    model = load_model(str(prefixed_dir / "model"), ptuning_checkpoint=str(prefixed_dir / "prefix"))
    prompts = prompts_of(tokenizer, 12)
    padded = tokenizer.pad({"input_ids": prompts[:6]}, padding_side="left", return_tensors="pt")
    layers = []
    original = hook.grow_in_place
    monkeypatch.setattr(
        hook, "grow_in_place", lambda cache: layers.append(original(cache).layers[0]) or cache
    )
    results = {}
    for mode in ("growing", "concatenating"):
        if mode == "concatenating":
            monkeypatch.setattr(hook, "grow_in_place", lambda cache: cache)
        with torch.no_grad():
            greedy = model.generate(**padded, max_new_tokens=300, min_new_tokens=300, do_sample=False)
            beams = model.generate(**padded, max_new_tokens=10, num_beams=3, do_sample=False)
        batched, _ = generate_texts(
            model, tokenizer, prompts, GenerationSettings(max_new_tokens=12), batch_size=5
        )
        results[mode] = (greedy.tolist(), beams.tolist(), batched)
    assert (
        type(layers[0]).__name__ == "GrowingLayer"
    )  # the growing run really grew (past one buffer: 300 tokens)
    assert results["growing"] == results["concatenating"]


def test_growing_layer_follows_crop_and_batch_selection():
    from transformers.cache_utils import DynamicLayer

    from ptuning_v2.kv_cache import GrowingLayer

    torch.manual_seed(0)
    grown, plain = GrowingLayer(), DynamicLayer()
    steps = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 300, 1)]
    for step in steps:
        for layer in (grown, plain):
            keys, values = layer.update(step, -step)
        torch.testing.assert_close(keys, plain.keys, rtol=0, atol=0)
        torch.testing.assert_close(grown.values, plain.values, rtol=0, atol=0)
    for layer in (grown, plain):
        layer.crop(-2)
        layer.update(steps[1], steps[1])
    torch.testing.assert_close(grown.keys, plain.keys, rtol=0, atol=0)
    for layer in (grown, plain):
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.update(steps[1][:2], steps[1][:2])
    torch.testing.assert_close(grown.keys, plain.keys, rtol=0, atol=0)
    torch.testing.assert_close(grown.values, plain.values, rtol=0, atol=0)
    assert grown.get_seq_length() == plain.get_seq_length() == 5 + 1 + 1 + 300 + 1 - 2 + 1 + 1
