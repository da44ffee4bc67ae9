"""ptuning_v2.plan: the memory planner's arithmetic against hand-computed cases, its CLI, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptuning_v2 import plan as P
from ptuning_v2.plan import PlanError, PlanSettings, model_shape, plan_memory
from ptuning_v2.quantization import cpu_compute_dtype

ROOT = Path(__file__).resolve().parent.parent

# A tiny GLM whose counts are worked out by hand below: 2 layers, hidden 64, 4 query heads and 2 key/value heads
# of 16, MLP 128, vocabulary 1000, QKV bias (GLM's attention_bias), untied output head.
TINY = {
    "model_type": "glm",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
    "attention_bias": True,
}
# Per layer: q 64*64+64, k and v 64*32+32 each, o 64*64, gate_up 64*256, down 128*64, two RMSNorms 2*64.
TINY_LAYER = 4160 + 2080 + 2080 + 4096 + 16384 + 8192 + 128
TINY_TOTAL = 2 * TINY_LAYER + 1000 * 64 * 2 + 64  # layers, embedding + lm_head, final norm
TINY_LINEAR = 4096 + 2048 + 2048 + 4096 + 16384 + 8192  # quantised weights per layer


def settings(**kwargs) -> PlanSettings:
    base = dict(torch_dtype="fp32", batch_size=2, seq_len=10, pre_seq_len=8, device="cpu")
    return PlanSettings(**{**base, **kwargs})


# ------------------------------------------------------------------------------------------------- parameters


def test_tiny_parameter_count_by_hand():
    shape = model_shape(TINY)
    assert shape.layer_parameters == TINY_LAYER == 37120
    assert shape.total_parameters == TINY_TOTAL == 202304
    assert shape.kv_size == 2 * 2 * 2 * 16


def test_tiny_parameter_count_matches_transformers():
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(**{k: v for k, v in TINY.items() if k != "model_type"}, pad_token_id=0)
    model = GlmForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == TINY_TOTAL
    assert model_shape(config) == model_shape(TINY)  # a PretrainedConfig reads like its dict


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("chatglm3-6b", 6_243_584_000),
        ("glm-4-9b-chat-hf", 9_399_951_360),
        ("qwen2.5-7b", 7_615_616_512),
        ("chatglm-6b", 6_173_286_400),
    ],
)
def test_shipped_configs_give_the_published_parameter_counts(name, published):
    assert model_shape(P.load_model_config(name)).total_parameters == published


def test_chatglm_names_read_like_transformers_names():
    chatglm = model_shape(P.load_model_config("chatglm3-6b"))
    assert (chatglm.num_layers, chatglm.num_kv_heads, chatglm.head_dim) == (28, 2, 128)
    assert (chatglm.intermediate_size, chatglm.vocab_size, chatglm.tie_word_embeddings) == (
        13696,
        65024,
        False,
    )
    native = dict(
        model_type="glm",
        num_hidden_layers=28,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        intermediate_size=13696,
        vocab_size=65024,
        tie_word_embeddings=False,
    )
    # ChatGLM2/3 originals are converted to GLM: same parameters, same plan.
    assert model_shape(native).total_parameters == chatglm.total_parameters
    first = model_shape(P.load_model_config("chatglm-6b"))
    assert (first.num_kv_heads, first.gated_mlp, first.tie_word_embeddings) == (32, False, True)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(method="ptuning_v2"), 8 * 2 * 2 * 2 * 16),  # pre_seq_len * 2 * layers * kv_heads * head_dim
        (
            dict(method="prefix_tuning"),
            1024 + (128 * 64 + 64) + (64 * 128 + 128),
        ),  # + the MLP (width = hidden)
        (dict(method="prefix_tuning", prefix_hidden_size=32), 1024 + (128 * 32 + 32) + (32 * 128 + 128)),
        (dict(method="prompt_tuning"), 8 * 64),
        (dict(method="residual_prompt_tuning"), 8 * 64 + 2 * (64 * 64 + 64) + 2 * 64),  # + MLP + LayerNorm
        (
            dict(method="residual_prompt_tuning", prompt_encoder_hidden_size=16),
            8 * 64 + (64 * 16 + 16) + (16 * 64 + 64) + 2 * 64,
        ),
        (dict(method="ptuning_v1", prompt_encoder_type="mlp"), 8 * 64 + (64 * 64 + 64) * 2),
        (dict(method="lora", lora_rank=4, lora_target_modules="attention"), 2 * 4 * (128 + 96 + 96 + 128)),
        (dict(method="lora", lora_rank=4), 2 * 4 * (128 + 96 + 96 + 128 + 320 + 192)),  # all-linear
        (dict(method="lora", lora_rank=4, lora_target_modules="query_key_value"), 2 * 4 * (128 + 96 + 96)),
        (dict(method="full"), TINY_TOTAL),
    ],
)
def test_trainable_parameters_by_hand(kwargs, expected):
    assert P.trainable_parameters(model_shape(TINY), settings(**kwargs)) == expected


def test_ptuning_v1_lstm_encoder_counts_like_torch():
    from torch import nn

    from ptuning_v2.methods.catalog import lstm_parameters

    lstm = nn.LSTM(64, 32, num_layers=2, bidirectional=True, batch_first=True)
    assert lstm_parameters(64, 32) == sum(p.numel() for p in lstm.parameters())


# ---------------------------------------------------------------------------------------------------- weights


def test_weights_unquantised_take_the_compute_dtype():
    shape = model_shape(TINY)
    assert P.weight_bytes(shape, settings(torch_dtype="fp32")) == TINY_TOTAL * 4
    assert P.weight_bytes(shape, settings(torch_dtype="bf16")) == TINY_TOTAL * 2


def test_weights_int4_and_int8_by_hand():
    shape = model_shape(TINY)
    kept_bf16 = (TINY_TOTAL - 2 * TINY_LINEAR) * 2  # embeddings, lm_head, norms, biases stay bf16
    # nf4: half a byte per weight + an fp32 absmax per 64 weights, per matrix.
    nf4 = sum(n // 2 + 4 * (n // 64) for n in (4096, 2048, 2048, 4096, 16384, 8192))
    assert nf4 == 20736
    assert P.weight_bytes(shape, settings(torch_dtype="bf16", quantization_bit=4)) == 2 * nf4 + kept_bf16
    # LLM.int8: a byte per weight + an fp32 scale per output row.
    int8 = sum(
        n + 4 * rows for n, rows in ((4096, 64), (2048, 32), (2048, 32), (4096, 64), (16384, 256), (8192, 64))
    )
    assert P.weight_bytes(shape, settings(torch_dtype="bf16", quantization_bit=8)) == 2 * int8 + kept_bf16
    # int4 halves int8's quantised weights (plus its constants).
    assert P.quantized_bytes(1 << 20, 1024, 4) == (1 << 19) + (1 << 16)
    assert P.quantized_bytes(1 << 20, 1024, 8) == (1 << 20) + 4096


# -------------------------------------------------------------------------------------------- trainable state


def test_adapter_state_is_16_bytes_per_parameter():
    state = P.trainable_state_bytes(1024, settings())
    assert (state.parameters, state.gradients, state.optimizer) == (4096, 4096, 8192)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (0, (4096, 4096, 8192)),
        (1, (4096, 4096, 1024 * 12 // 4)),  # optimizer (fp32 master + 2 moments) over 4 GPUs
        (2, (4096, 4096 // 4, 1024 * 12 // 4)),  # + gradients
        (3, (4096 // 4, 4096 // 4, 1024 * 12 // 4)),  # + parameters
    ],
)
def test_zero_stages_shard_over_gpus(stage, expected):
    state = P.trainable_state_bytes(1024, settings(zero_stage=stage, num_gpus=4))
    assert (state.parameters, state.gradients, state.optimizer) == expected


def test_full_fine_tuning_in_bf16_keeps_an_fp32_master():
    state = P.trainable_state_bytes(1000, settings(method="full", torch_dtype="bf16"))
    assert (state.parameters, state.gradients, state.optimizer) == (2000, 2000, 12000)


def test_zero3_shards_the_frozen_weights_and_offload_moves_state_to_the_host():
    one = plan_memory(TINY, settings(torch_dtype="bf16"))
    four = plan_memory(TINY, settings(torch_dtype="bf16", zero_stage=3, num_gpus=4))
    assert four.parts["frozen_weights"] == one.parts["frozen_weights"] // 4
    offload = plan_memory(
        TINY, settings(zero_stage=3, num_gpus=4, offload_optimizer=True, offload_param=True)
    )
    assert offload.parts["optimizer"] == 0 and offload.parts["frozen_weights"] == 0 and offload.host_bytes > 0


# ------------------------------------------------------------------------------------------------ activations


def test_layer_activations_by_hand():
    # fp32, batch 2 x 10 tokens (T = 20), prefix 8 (S_kv = 18), SDPA.
    shape, s = model_shape(TINY), settings()
    norms = 2 * (20 * 64 * 4 + 20 * 4)  # fp32 inputs + rsqrt
    rope = 2 * 2 * 10 * 8 * 4  # cos, sin: B x S x rotary_dim (16 * 0.5)
    sdpa = 2 * 20 * 64 * 4 + 2 * 2 * 4 * 18 * 16 * 4 + 2 * 4 * 10 * 4  # q + out, k + v (repeated), logsumexp
    mask = 2 * 10 * 18 * 4
    mlp = 3 * 20 * 128 * 4
    assert P.layer_activation_bytes(shape, s) == norms + rope + sdpa + mask + mlp == 72832
    # The first layer's input needs no gradient with a prefix: no first norm, no RoPE.
    assert P.layer_activation_bytes(shape, s, first=True) == 72832 - (20 * 64 * 4 + 20 * 4) - rope


def test_eager_attention_saves_the_scores():
    shape = model_shape(TINY)
    eager = P.layer_activation_bytes(shape, settings(attn_implementation="eager"))
    probs = 2 * 4 * 10 * 18 * 4  # B x heads x S x (S + P), fp32 softmax
    assert eager == 10400 + 1280 + 20 * 64 * 4 + 2 * 2 * 4 * 18 * 16 * 4 + probs + 3 * 20 * 128 * 4
    # bf16 keeps the fp32 softmax and its bf16 copy; the norms' inputs stay fp32.
    bf16 = P.layer_activation_bytes(shape, settings(attn_implementation="eager", torch_dtype="bf16"))
    assert (
        bf16
        == 10400 + 1280 // 2 + 20 * 64 * 2 + 2 * 2 * 4 * 18 * 16 * 2 + probs + probs // 2 + 3 * 20 * 128 * 2
    )


def test_prefix_adds_keys_to_every_layer_and_virtual_tokens_lengthen_the_sequence():
    shape = model_shape(TINY)
    assert P.layer_activation_bytes(shape, settings(pre_seq_len=64)) > P.layer_activation_bytes(
        shape, settings()
    )
    prompt = plan_memory(TINY, settings(method="prompt_tuning", pre_seq_len=8))
    # the loss runs over S + P positions
    assert prompt.parts["workspace_loss"] == 2 * (2 * 18) * 1000 * 4


def test_gradient_checkpointing_keeps_only_layer_inputs():
    acts = P.activation_bytes(model_shape(TINY), settings(gradient_checkpointing=True))
    assert acts.layers == 2 * 20 * 64 * 4 + 2 * 8 * 128 * 4  # layer inputs + the prefix in the cache
    full = P.activation_bytes(model_shape(TINY), settings())
    assert acts.total < full.total


def test_loss_workspace_is_two_fp32_logit_gradients():
    plan = plan_memory(TINY, settings())
    assert plan.parts["workspace_loss"] == 2 * 20 * 1000 * 4


# ---------------------------------------------------------------------------------------------------- the plan


def test_total_is_the_sum_of_the_parts_at_the_peak():
    plan = plan_memory(TINY, settings())
    assert plan.total_bytes == plan.weights + plan.trainable + plan.activations + plan.workspace
    assert plan.total_bytes == max(plan.phases.values()) == plan.phases[plan.phase]
    text = plan.describe()
    for word in ("weights", "trainable", "activations", "workspace", "total"):
        assert f"| {word}" in text or f"**{word}**" in text


def test_int4_plan_is_smaller_than_bf16_for_a_real_model():
    config = P.load_model_config("glm-4-9b-chat-hf")
    bf16 = plan_memory(config, PlanSettings(torch_dtype="bf16", batch_size=1, seq_len=513))
    int4 = plan_memory(
        config, PlanSettings(torch_dtype="bf16", batch_size=1, seq_len=513, quantization_bit=4)
    )
    assert int4.weights < bf16.weights / 2.5
    assert int4.trainable_parameters == 128 * 40 * 2 * 2 * 128  # the README's 2.6 M


def test_chatglm_6b_int4_estimate_is_stated_next_to_thudms_7_gb():
    plan = plan_memory(
        P.load_model_config("chatglm-6b"),
        PlanSettings(pre_seq_len=128, quantization_bit=4, torch_dtype="fp16", batch_size=1, seq_len=128),
    )
    stated = f"{plan.total_bytes / P.GIB:.2f} GiB ({plan.total_bytes / 1e9:.2f} GB)"
    assert stated in P.__doc__ and stated in P._EPILOG
    assert plan.total_bytes < 7e9


def test_bad_settings_name_the_flag():
    with pytest.raises(PlanError, match="--method 'adapter'"):
        PlanSettings(method="adapter")
    with pytest.raises(PlanError, match="--per_device_train_batch_size -1"):
        PlanSettings(batch_size=-1)
    with pytest.raises(PlanError, match="--quantization_bit '3'"):
        PlanSettings(quantization_bit="3")
    with pytest.raises(PlanError, match="--torch_dtype 'fp8'"):
        PlanSettings(torch_dtype="fp8")
    with pytest.raises(PlanError, match="--method full with --quantization_bit 4"):
        PlanSettings(method="full", quantization_bit=4)
    with pytest.raises(PlanError, match="lora_target_modules 'w_pack'"):
        plan_memory(TINY, settings(method="lora", lora_target_modules="w_pack"))
    with pytest.raises(PlanError, match="number of layers"):
        model_shape({"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10})


def test_device_memory_bytes_is_the_ram_without_a_gpu():
    total = P.device_memory_bytes()
    assert total > 0
    if not P.cuda_available():
        assert total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -------------------------------------------------------------------------------------------------------- CLI


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = P.main([*argv, "--device", "cpu", "--no_device_check"] if "--device" not in argv else list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_takes_the_training_flag_names(capsys):
    code, out, _ = run_main(
        capsys,
        "--model_name_or_path", "THUDM/chatglm3-6b",  # a Hub id maps to the shipped config
        "--per_device_train_batch_size", "1",
        "--max_source_length", "64",
        "--max_target_length", "128",
        "--quantization_bit", "4",
        "--gradient_checkpointing",
        "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
        "--num_gpus", "2",
        "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"model", "settings", "parameters", "bytes", "gib", "phase", "device_memory_bytes"}
    assert set(result["bytes"]) == {"weights", "trainable", "activations", "workspace", "total"}
    s = result["settings"]
    assert (s["batch_size"], s["seq_len"], s["quantization_bit"], s["gradient_checkpointing"]) == (
        1,
        193,
        4,
        True,
    )
    # planned for this CPU (no GPU here): a 4-bit backbone computes in bf16 where the CPU has AVX512-BF16/AMX
    assert (s["zero_stage"], s["num_gpus"], s["torch_dtype"]) == (2, 2, cpu_compute_dtype(quantized=True))
    assert result["bytes"]["total"] == sum(v for k, v in result["bytes"].items() if k != "total")


def test_cli_reads_offloads_from_the_deepspeed_config(capsys):
    code, out, _ = run_main(capsys, "--model", "glm-4-9b-chat-hf", "--deepspeed", "ds_configs/zero3_offload.json",
                            "--json")  # fmt: skip
    settings_ = json.loads(out)["settings"]
    assert (
        code == 0
        and settings_["zero_stage"] == 3
        and settings_["offload_optimizer"]
        and settings_["offload_param"]
    )


def test_cli_boolean_spellings_and_model_directory(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    code, out, _ = run_main(capsys, "--model", str(tmp_path), "--gradient_checkpointing", "off", "--json")
    assert code == 0 and json.loads(out)["settings"]["gradient_checkpointing"] is False
    assert json.loads(out)["parameters"]["total"] == TINY_TOTAL
    code, out, _ = run_main(capsys, "--model", str(tmp_path / "config.json"), "--seq_len", "10")
    assert code == 0 and "| **total** |" in out


def test_cli_warns_when_the_plan_exceeds_the_device(capsys, monkeypatch):
    monkeypatch.setattr(P, "device_memory_bytes", lambda: 1024)
    code = P.main(["--model", "qwen2.5-7b", "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == 0 and err.startswith("warning: the plan needs") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--model", "nope-7b"], 1, "error: --model 'nope-7b': no such file or directory"),
        (["--model", "missing/dir/config.json"], 1, "error: --model 'missing/dir/config.json'"),
        (["--method", "adapter"], 2, "error: --method 'adapter': use one of"),
        (
            ["--per_device_train_batch_size", "-2"],
            2,
            "error: --per_device_train_batch_size -2: must be a positive integer",
        ),
        (["--pre_seq_len", "abc"], 2, "error: argument --pre_seq_len: invalid int value: 'abc'"),
        (["--quantization_bit", "3"], 2, "error: --quantization_bit '3': use 4, 8 or none"),
        (["--seq_len", "10", "--max_source_length", "5"], 2, "error: --seq_len: give either"),
        (["--max_source_length", "-5"], 2, "error: --max_source_length -5"),
        (["--deepspeed", "no/such.json"], 1, "error: --deepspeed 'no/such.json': cannot read it"),
        (["--zero_stage", "5"], 2, "error: --zero_stage 5"),
        (["--learning_rate", "2e-2"], 2, "error: unrecognized arguments: --learning_rate 2e-2"),
    ],
)
def test_cli_bad_input_is_one_error_line(capsys, argv, code, message):
    got, out, err = run_main(capsys, *argv)
    assert got == code and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


def test_cli_ignore_unknown_args(capsys):
    code, out, _ = run_main(
        capsys, "--model", "chatglm3-6b", "--learning_rate", "2e-2", "--ignore_unknown_args"
    )
    assert code == 0 and "memory plan: chatglm3-6b" in out


def test_cli_as_a_module_prints_no_traceback_and_the_thudm_comparison_in_help(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "ptuning_v2.plan", "--model", str(bad), "--device", "cpu"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: --model {str(bad)!r}: not valid JSON") and done.stdout == ""
    helped = subprocess.run([sys.executable, "-m", "ptuning_v2.plan", "--help"], cwd=ROOT, capture_output=True,
                            text=True, env=env)  # fmt: skip
    assert helped.returncode == 0 and "7 GB" in helped.stdout and "chatglm-6b" in helped.stdout


def test_cli_reads_the_trainers_settings_file_and_flags_win(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: chatglm3-6b\nmethod: ptuning_v2\nprefix_projection: true\npre_seq_len: 64\n"
        "per_device_train_batch_size: 16\nmax_source_length: 96\nmax_target_length: 48\nlearning_rate: 0.1\n"
        "quantization_bit: none\ngradient_checkpointing: true\n"
    )
    code, out, _ = run_main(capsys, "--config", str(config), "--per_device_train_batch_size", "2", "--json")
    s = json.loads(out)["settings"]
    assert code == 0 and json.loads(out)["model"] == "chatglm3-6b"
    assert (s["method"], s["pre_seq_len"], s["batch_size"], s["seq_len"]) == ("prefix_tuning", 64, 2, 145)
    assert s["quantization_bit"] is None and s["gradient_checkpointing"] is True
    code, out, _ = run_main(capsys, "--config", str(config), "--seq_len", "512", "--json")
    assert code == 0 and json.loads(out)["settings"]["seq_len"] == 512  # the command line's length wins
    code, _, err = run_main(capsys, "--config", str(tmp_path / "missing.yaml"))
    assert code == 1 and err.startswith("error: --config") and err.count("\n") == 1


def test_cli_summary_is_one_line(capsys):
    code, out, _ = run_main(capsys, "--model", "glm-4-9b-chat-hf", "--quantization_bit", "4", "--summary")
    assert code == 0 and out.startswith("memory plan: ") and out.count("\n") == 1
