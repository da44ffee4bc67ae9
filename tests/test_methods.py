"""Every method of the family through the recipe: scripts/train_pt2.sh trains, saves and resumes it exactly,
load_model loads it back, the chat answers with it, and its trainable parameters are what its formula says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_runs import train_through_script
from test_train import ner_rows, write_jsonl
from tiny_models import save_tiny_backbone
from torch import nn

from ptuning_v2 import count_parameters, load_model, load_tokenizer
from ptuning_v2.data import generation_prompt_ids
from ptuning_v2.generation import GenerationSettings, generate_texts
from ptuning_v2.methods import METHODS, attach_method, method_config
from ptuning_v2.plan import PlanSettings, model_shape, trainable_parameters
from ptuning_v2.serving import Engine, SamplingParams
from ptuning_v2.serving.chat import main as chat_main
from ptuning_v2.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
P = 4  # virtual tokens / prefix length
# Dropout off, so a resumed run can be compared with a straight one tensor by tensor.
METHOD_SETTINGS = {
    "ptuning_v2": ["LR=0.3", "PREFIX_DROPOUT=0"],
    "prefix_tuning": ["LR=0.01", "PREFIX_DROPOUT=0"],
    "ptuning_v1": ["LR=0.01"],
    "prompt_tuning": ["LR=0.3"],
    "residual_prompt_tuning": ["LR=0.01"],
    "lora": ["LR=0.01", "LORA_DROPOUT=0"],
    "full": ["LR=0.001"],
}
# The tensors a method's checkpoint holds, by file.
WEIGHTS = {
    "ptuning_v2": "prefix_model.safetensors",
    "prefix_tuning": "prefix_model.safetensors",
    "full": "model.safetensors",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    rows = ner_rows()
    write_jsonl(root / "train.json", rows)
    texts = [r["content"] + r["summary"] for r in rows] + ["正面负面无你好"]
    save_tiny_backbone(root / "model", texts, initializer_range=0.2)
    return root


def train_script(workdir: Path, out: Path, method: str, *extra: str) -> str:
    return train_through_script(
        f"MODEL={workdir / 'model'}", f"TRAIN_FILE={workdir / 'train.json'}", "VALIDATION_FILE=",
        f"OUTPUT_DIR={out}", f"METHOD={method}", f"PRE_SEQ_LEN={P}", "MAX_STEPS=4", "SAVE_STEPS=2",
        "BATCH_SIZE=4", "LOGGING_STEPS=1", "MAX_SOURCE_LENGTH=32", "MAX_TARGET_LENGTH=24", "SEED=3",
        *METHOD_SETTINGS[method], *extra, "--report_to", "none",
    )  # fmt: skip


def saved_tensors(directory: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS.get(method, "tuning_model.safetensors")))


@pytest.fixture(scope="module")
def trained(workdir, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Each method trained 4 steps (checkpoints at 2 and 4), and the printed line of its trainable count."""
    runs = {}
    for method in METHODS:
        out = tmp_path_factory.mktemp(method) / "run"
        printed = train_script(workdir, out, method)
        counted = next(line for line in printed.splitlines() if line.startswith(f"{method}: trainable"))
        runs[method] = (out, counted)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_trains_saves_and_records_its_method(workdir, trained, method):
    out, _ = trained[method]
    config = out / (
        "prefix_config.json" if method in ("ptuning_v2", "prefix_tuning") else "tuning_config.json"
    )
    assert f'"method": "{method}"' in config.read_text()
    assert (out / "checkpoint-2").is_dir() and (out / "run_config.yaml").is_file()
    tensors = saved_tensors(out, method)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    if method != "full":  # only what the method trains: far fewer values than the backbone has
        backbone = load_file(str(workdir / "model" / "model.safetensors"))
        assert sum(t.numel() for t in tensors.values()) < sum(t.numel() for t in backbone.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_resume_continues_exactly(workdir, trained, method, tmp_path):
    out, _ = trained[method]
    branch = tmp_path / "resumed"
    train_script(workdir, branch, method, f"RESUME={out / 'checkpoint-2'}")
    straight, resumed = saved_tensors(out, method), saved_tensors(branch, method)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_loads_back_through_load_model(workdir, trained, method):
    out, _ = trained[method]
    model = load_model(str(workdir / "model"), str(out))
    assert model.tuning.name == method
    state = model.tuning.state_dict() if method != "full" else model.state_dict()
    saved = saved_tensors(out, method)
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name].float().cpu(), tensor.float(), msg=name)
    if method != "full":  # the method changes what the backbone answers, and bare() undoes it
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            tuned = model(input_ids=ids).logits[:, -1]
            with model.tuning.bare():
                bare = model(input_ids=ids).logits[:, -1]
            plain = load_model(str(workdir / "model"))(input_ids=ids).logits[:, -1]
        torch.testing.assert_close(bare, plain)
        assert not torch.allclose(tuned, plain)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_chat_answers_with_the_checkpoint(workdir, trained, method, capsys):
    out, _ = trained[method]
    flags = [
        "--model", str(workdir / "model"), "--checkpoint", str(out), "--query", "找出实体：张三在北京",
        "--max_new_tokens", "6",
    ]  # fmt: skip
    if method == "ptuning_v2":  # the command line once; the other methods in this process (no start-up cost)
        command = [sys.executable, "-m", "ptuning_v2.chat", *flags]
        result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "error" not in result.stderr.lower()
        return
    chat_main(flags)
    printed = capsys.readouterr()
    assert printed.out.endswith("\n") and "error" not in printed.err.lower()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ptuning_v1", "prompt_tuning", "residual_prompt_tuning", "lora", "full"])
def test_engine_answers_what_generate_answers(workdir, trained, method):
    """The serving engine runs virtual tokens as a prefix (positions from P) and LoRA/full as the backbone: the
    greedy answer must be the one ``generate`` gives with the method attached."""
    out, _ = trained[method]
    tokenizer = load_tokenizer(str(workdir / "model"))
    messages = [{"role": "user", "content": "找出实体：李四在上海见到新华社记者。"}]
    prompt = generation_prompt_ids(messages, tokenizer)
    model = load_model(str(workdir / "model"), str(out))
    expected, _ = generate_texts(
        model, tokenizer, [prompt], GenerationSettings(max_new_tokens=8), progress=False
    )
    with Engine.load(str(workdir / "model"), {"tuned": str(out)}) as engine:
        prefix = "tuned" if "tuned" in engine.prefix_names else None
        answer = engine.complete(messages, prefix, SamplingParams(max_new_tokens=8)).text
    assert answer.strip() == expected[0]


@pytest.mark.slow
def test_residual_prompts_are_served_beside_prefixes(workdir, trained):
    """Residual Prompt Tuning's virtual tokens become a prefix, so it shares one backbone with P-Tuning v2 and
    Prefix-Tuning checkpoints; each answers what ``generate`` gives with that checkpoint attached."""
    tokenizer = load_tokenizer(str(workdir / "model"))
    messages = [{"role": "user", "content": "找出实体：李四在上海见到新华社记者。"}]
    prompt = generation_prompt_ids(messages, tokenizer)
    served = {m: str(trained[m][0]) for m in ("residual_prompt_tuning", "ptuning_v2", "prefix_tuning")}
    with Engine.load(str(workdir / "model"), served) as engine:
        assert engine.prefix_names == list(served)
        answers = {m: engine.complete(messages, m, SamplingParams(max_new_tokens=8)).text for m in served}
    for method, path in served.items():
        model = load_model(str(workdir / "model"), path)
        expected, _ = generate_texts(
            model, tokenizer, [prompt], GenerationSettings(max_new_tokens=8), progress=False
        )
        assert answers[method].strip() == expected[0], method


# ---------------------------------------------------------------- trainable parameters, by formula


def _linear_lora(model: nn.Module, rank: int) -> int:
    # PEFT's all-linear: every nn.Linear but the output head.
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head")
    )


def _lstm(hidden: int, width: int) -> int:
    half = width // 2
    layer1 = 4 * half * (hidden + half) + 8 * half
    layer2 = 4 * half * (2 * half + half) + 8 * half
    return 2 * (layer1 + layer2)  # two directions


@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_parameters_match_their_formula(workdir, method):
    model = load_model(str(workdir / "model"))
    config = model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = (
        2 * layers * config.num_key_value_heads * config.head_dim
    )  # keys and values of every layer, per token
    expected = {
        "ptuning_v2": P * kv,
        "prefix_tuning": P * kv + (kv * hidden + hidden) + (hidden * kv + kv),
        "ptuning_v1": P * hidden
        + _lstm(hidden, hidden)
        + (hidden * hidden + hidden)
        + (hidden * hidden + hidden),
        "prompt_tuning": P * hidden,
        # the prompt, then Linear(h, h) -> ReLU -> Linear(h, h) -> LayerNorm(h) (bottleneck: the hidden size)
        "residual_prompt_tuning": P * hidden + 2 * (hidden * hidden + hidden) + 2 * hidden,
        "lora": _linear_lora(model, 8),
        "full": sum(p.numel() for p in model.parameters()),
    }[method]
    planned = trainable_parameters(model_shape(model.config), PlanSettings(method=method, pre_seq_len=P))
    attach_method(model, method, method_config(method, {"pre_seq_len": P}))
    trainable, _ = count_parameters(model)
    assert trainable == expected
    assert planned == expected  # the planner's formula (the method's catalog entry) counts what is built
    assert {id(p) for p in model.tuning.trainable_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


@pytest.mark.slow
def test_the_script_prints_the_same_counts(workdir, trained):
    for method, (_, line) in trained.items():
        model = load_model(str(workdir / "model"))
        attach_method(model, method, method_config(method, {"pre_seq_len": P}))
        assert f"trainable {count_parameters(model)[0]:,} " in line, (method, line)


# ---------------------------------------------------------------- refusals


def test_a_quantized_backbone_cannot_be_fully_fine_tuned(workdir, tmp_path):
    command = [
        "bash", str(ROOT / "scripts/train_pt2.sh"), f"MODEL={workdir / 'model'}",
        f"TRAIN_FILE={workdir / 'train.json'}", "VALIDATION_FILE=", f"OUTPUT_DIR={tmp_path / 'out'}",
        "METHOD=full", "QUANTIZATION_BIT=4",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--method full with --quantization_bit 4" in result.stderr
    assert not (tmp_path / "out").exists()


def test_warm_start_refuses_another_methods_checkpoint(workdir, tmp_path):
    model = load_model(str(workdir / "model"))
    attach_method(model, "prompt_tuning", method_config("prompt_tuning", {"pre_seq_len": P}))
    model.tuning.save(tmp_path / "prompt")
    with pytest.raises(ValueError, match="is a prompt_tuning checkpoint, but --method is lora"):
        train_main(
            [
                "--model_name_or_path", str(workdir / "model"), "--train_file", str(workdir / "train.json"),
                "--output_dir", str(tmp_path / "out"), "--method", "lora", "--do_train",
                "--ptuning_checkpoint", str(tmp_path / "prompt"), "--report_to", "none",
            ]
        )  # fmt: skip


def test_a_checkpoint_that_changes_weights_is_served_alone(workdir, tmp_path):
    model = load_model(str(workdir / "model"))
    attach_method(model, "lora", method_config("lora", {}))
    model.tuning.save(tmp_path / "lora")
    prefixed = load_model(str(workdir / "model"))
    attach_method(prefixed, "ptuning_v2", method_config("ptuning_v2", {"pre_seq_len": P}))
    prefixed.tuning.save(tmp_path / "prefix")
    with pytest.raises(ValueError, match="cannot share a backbone"):
        Engine.load(str(workdir / "model"), {"a": str(tmp_path / "lora"), "b": str(tmp_path / "prefix")})


def test_a_tuning_checkpoint_with_a_corrupt_file_is_named(workdir, tmp_path):
    model = load_model(str(workdir / "model"))
    attach_method(model, "ptuning_v1", method_config("ptuning_v1", {"pre_seq_len": P}))
    model.tuning.save(tmp_path / "v1")
    weights = tmp_path / "v1" / "tuning_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="tuning_model.safetensors"):
        load_model(str(workdir / "model"), str(tmp_path / "v1"))
    shutil.rmtree(tmp_path / "v1")
