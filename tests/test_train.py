"""The training recipe end to end on a tiny backbone saved by the test: learning, resume, checkpoints, bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_runs import train_through_script
from tiny_models import save_tiny_backbone

from ptuning_v2 import load_model
from ptuning_v2.train import NonFiniteError, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
NAMES, PLACES, ORGS = (
    ["张三", "李四", "王五", "赵六"],
    ["北京", "上海", "广州", "深圳"],
    ["新华社", "人民日报"],
)


def ner_rows(n: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, place, org = rng.choice(NAMES), rng.choice(PLACES), rng.choice(ORGS)
        rows.append(
            {
                "content": f"找出实体：{name}在{place}见到{org}记者。",
                "summary": f"人名：{name}；地名：{place}；机构名：{org}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    rows = ner_rows()
    write_jsonl(root / "train.json", rows)
    texts = [r["content"] + r["summary"] for r in rows] + ["正面负面无"]
    # A larger init than HF's 0.02, so a prefix can move a random backbone's logits at all.
    save_tiny_backbone(root / "model", texts, initializer_range=0.2)
    return root


def train_args(
    workdir: Path, out: Path, *extra: str, steps: int = 8, train_file: Path | None = None
) -> list[str]:
    return [
        "--model_name_or_path", str(workdir / "model"),
        "--train_file", str(train_file or workdir / "train.json"),
        "--output_dir", str(out),
        "--pre_seq_len", "8",
        "--prefix_dropout", "0.0",
        "--learning_rate", "0.3",
        "--max_steps", str(steps),
        "--save_steps", str(steps),
        "--per_device_train_batch_size", "4",
        "--logging_steps", "1",
        "--max_source_length", "32",
        "--max_target_length", "32",
        "--max_new_tokens", "24",
        "--report_to", "none",
        "--do_train",
        "--seed", "7",
        *extra,
    ]  # fmt: skip


def log_losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def prefix_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "prefix_model.safetensors")


def test_loss_falls_below_half(workdir, capsys):
    out = workdir / "learn"
    main(train_args(workdir, out, "--per_device_train_batch_size", "16", steps=100))
    losses = log_losses(out / "checkpoint-100")
    assert losses[-1] < losses[0] / 2, (losses[0], losses[-1])
    printed = capsys.readouterr().out
    assert "trainable 512 / total" in printed  # 8 tokens x (2 layers x 2 (k,v) x 2 heads x 8 dims)
    assert (out / "loss_curve.png").stat().st_size > 1000
    # the final checkpoint loads through load_model
    model = load_model(str(workdir / "model"), ptuning_checkpoint=str(out))
    assert model.tuning.config.pre_seq_len == 8


def test_resume_continues_exactly(workdir):
    # constant LR: a run that stops at N has the same schedule as one that goes on to 2N
    common = ("--lr_scheduler_type", "constant", "--prefix_dropout", "0.2", "--learning_rate", "0.05")
    straight, resumed = workdir / "straight", workdir / "resumed"
    main(train_args(workdir, straight, *common, "--save_steps", "6", steps=12))
    main(train_args(workdir, resumed, *common, steps=6))
    main(
        train_args(
            workdir, resumed, *common, "--resume_from_checkpoint", str(resumed / "checkpoint-6"), steps=12
        )
    )
    a, b = prefix_weights(straight), prefix_weights(resumed)
    assert torch.allclose(a["embedding.weight"], b["embedding.weight"], atol=1e-6, rtol=0)
    assert not torch.allclose(
        prefix_weights(resumed / "checkpoint-6")["embedding.weight"], a["embedding.weight"]
    )


def test_checkpoints_hold_only_the_prefix(workdir):
    out = workdir / "projection"
    main(train_args(workdir, out, "--method", "prefix_tuning", "--prefix_hidden_size", "16", steps=2))
    checkpoint = out / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"prefix_model.safetensors", "prefix_config.json", "optimizer.pt", "scheduler.pt"} <= names
    assert not any(n.startswith("model") or n.endswith(".bin") and n != "training_args.bin" for n in names)
    model = load_model(str(workdir / "model"), ptuning_checkpoint=str(checkpoint))
    expected = sum(p.numel() for p in model.tuning.encoder.parameters())  # embedding + MLP
    stored = sum(t.numel() for f in checkpoint.glob("*.safetensors") for t in load_file(f).values())
    assert stored == expected
    assert not list(out.glob(".staging*")) and not list(out.glob("**/.tmp-prefix-*"))


@pytest.mark.parametrize("bits", ["8", "4"])
def test_quantized_backbone_trains(workdir, bits):
    pytest.importorskip("bitsandbytes")
    out = workdir / f"int{bits}"
    main(train_args(workdir, out, "--quantization_bit", bits, "--learning_rate", "0.05", steps=3))
    assert all(torch.isfinite(torch.tensor(v)) for v in log_losses(out / "checkpoint-3"))
    model = load_model(str(workdir / "model"), ptuning_checkpoint=str(out), quantization_bit=bits)
    layer_types = {type(m).__name__ for m in model.modules()}
    assert ("Linear8bitLt" if bits == "8" else "Linear4bit") in layer_types
    assert model.tuning.encoder.embedding.weight.dtype == torch.float32


def test_evaluation_before_and_after(workdir, capsys):
    out = workdir / "evaluated"
    extra = ("--validation_file", str(workdir / "train.json"), "--do_eval", "--compare_with_base", "true")
    results = main(train_args(workdir, out, *extra, "--eval_generate_steps", "2", steps=4))
    assert set(results["eval"]) == {"before", "after"}
    for key in ("rouge-1", "bleu-4", "entity-f1"):
        assert key in results["eval"]["after"]
    lines = (out / "generated_predictions.txt").read_text().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])) == {"labels", "predict"}
    assert (out / "before" / "generated_predictions.txt").exists()
    assert (out / "step-2" / "generated_predictions.txt").exists()  # evaluated during training too
    assert "| metric | before (backbone alone) | after (ptuning_v2) | change |" in capsys.readouterr().out


def test_config_file_instead_of_flags(tmp_path):
    settings = {
        "model_name_or_path": "m",
        "train_file": "t.json",
        "output_dir": str(tmp_path),
        "pre_seq_len": 64,
    }
    (tmp_path / "run.json").write_text(json.dumps(settings))
    (tmp_path / "run.yaml").write_text(
        "model_name_or_path: m\noutput_dir: out\npre_seq_len: 32\nlearning_rate: 0.02\n"
    )
    settings = parse_args([str(tmp_path / "run.json")])
    assert settings.method.pre_seq_len == 64 and settings.data.train_file == "t.json"
    settings = parse_args([str(tmp_path / "run.yaml")])
    assert settings.method.pre_seq_len == 32 and settings.training.learning_rate == 0.02
    # --config FILE with flags beside it: the flags win
    settings = parse_args(["--config", str(tmp_path / "run.yaml"), "--pre_seq_len", "4"])
    assert settings.method.pre_seq_len == 4 and settings.training.learning_rate == 0.02
    # a wrong type or an unknown key names the file, the key and the value
    (tmp_path / "bad.yaml").write_text("learning_rate: fast\n")
    with pytest.raises(ValueError, match=r"bad.yaml: learning_rate: 'fast' is not valid"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "typo.yaml").write_text("max_stepz: 3\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown setting 'max_stepz'"):
        parse_args(["--config", str(tmp_path / "typo.yaml")])


def test_a_run_records_settings_that_repeat_it(workdir, tmp_path):
    out = tmp_path / "out"
    main(train_args(workdir, out, steps=1))
    settings = parse_args(["--config", str(out / "run_config.yaml")])
    assert settings.training.max_steps == 1 and settings.training.do_train
    assert settings.method.pre_seq_len == 8 and settings.training.learning_rate == 0.3
    assert settings.data.train_file == str(workdir / "train.json")


# ---------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_and_line(workdir, tmp_path):
    bad = tmp_path / "bad.json"
    rows = [json.dumps(r, ensure_ascii=False) for r in ner_rows(3)]
    bad.write_text(rows[0] + "\n" + rows[1] + "\n{not json\n" + rows[2] + "\n")
    with pytest.raises(ValueError, match=f"{bad}:3"):
        main(train_args(workdir, tmp_path / "out", train_file=bad))


def test_missing_column_names_it_and_the_available_ones(workdir, tmp_path):
    bad = write_jsonl(tmp_path / "cols.json", [{"content": "问题", "answer": "回答"}])
    with pytest.raises(ValueError) as err:
        main(train_args(workdir, tmp_path / "out", train_file=bad))
    assert "summary" in str(err.value) and "answer" in str(err.value) and "cols.json:1" in str(err.value)


def test_empty_file_is_reported(workdir, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.json"):
        main(train_args(workdir, tmp_path / "out", train_file=empty))


def test_empty_responses_are_counted_and_all_empty_refused(workdir, tmp_path, capsys):
    rows = ner_rows(4)
    rows[1]["summary"] = ""
    some = write_jsonl(tmp_path / "some.json", rows)
    main(train_args(workdir, tmp_path / "out", train_file=some, steps=1))
    assert "dropped 1" in capsys.readouterr().out
    none = write_jsonl(tmp_path / "none.json", [{"content": "问题", "summary": " "}])
    with pytest.raises(ValueError, match="empty"):
        main(train_args(workdir, tmp_path / "out2", train_file=none, steps=1))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(workdir, tmp_path):
    out = tmp_path / "nan"
    # Warm-up makes step 1's learning rate 0 (a good checkpoint-1); then an absurd one turns the prefix into inf.
    # (The bound on prefix weights would stop it earlier, as saturated: test_bad_input_train covers that.)
    extra = ("--learning_rate", "1e38", "--warmup_steps", "3", "--save_steps", "1", "--max_grad_norm", "0")
    extra += ("--max_prefix_weight", "0")
    args = train_args(workdir, out, *extra, steps=5)
    with pytest.raises(NonFiniteError) as err:
        main(args)
    saved = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert saved, "the steps before the failure were checkpointed"
    assert f"Last good checkpoint: {saved[-1]}" in str(err.value)
    assert "nan" in str(err.value) or "inf" in str(err.value)
    assert not (out / "prefix_model.safetensors").exists()  # no final save of a broken prefix
    assert int(saved[-1].name.split("-")[1]) < 5
    for checkpoint in saved:
        assert torch.isfinite(prefix_weights(checkpoint)["embedding.weight"]).all()


def run_script(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "train_pt2.sh"), *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_script_refuses_unknown_keys():
    result = run_script("PRE_SEQ_LEN=8", "PRE_SEQ_LENGTH=8")
    assert result.returncode == 2
    assert "unknown setting 'PRE_SEQ_LENGTH'" in result.stderr


def script_settings(workdir: Path, out: Path) -> list[str]:
    return [
        f"MODEL={workdir / 'model'}",
        f"TRAIN_FILE={workdir / 'train.json'}",
        "VALIDATION_FILE=",
        f"OUTPUT_DIR={out}",
        "PRE_SEQ_LEN=4",
        "MAX_STEPS=4",
        "SAVE_STEPS=2",
        "BATCH_SIZE=4",
        "LR=0.1",
        "MAX_SOURCE_LENGTH=32",
        "MAX_TARGET_LENGTH=32",
        "RETENTION=false",  # these runs are about output directories and processes; test_retention scores it
        "--report_to",
        "none",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_process_deepspeed_through_the_script(workdir, stage):
    out = workdir / f"ds-{stage}"
    result = run_script(
        *script_settings(workdir, out),
        env={
            "NUM_GPUS": "2",
            "DS_CONFIG": f"ds_configs/{stage}.json",
            "MASTER_PORT": str(29600 + len(stage)),
        },
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "+ torchrun --nproc_per_node 2" in result.stdout
    assert result.stdout.count("trainable 256 / total") == 2  # both processes report
    for step in (2, 4):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {
            "prefix_model.safetensors",
            "rng_state_0.pth",
            "rng_state_1.pth",
            f"global_step{step}",
        } <= files
    model = load_model(str(workdir / "model"), ptuning_checkpoint=str(out))
    assert torch.isfinite(model.tuning.encoder.embedding.weight).all()
    # DeepSpeed's own files hold the prefix only, never the frozen backbone
    states = [
        torch.load(f, weights_only=False)
        for f in (out / "checkpoint-4" / "global_step4").glob("*model_states.pt")
    ]
    for state in states:
        assert all(k.startswith("prefix_encoder.") for k in state["module"] or {})


def test_script_prints_the_command_and_passes_flags(workdir):
    out = workdir / "script-single"
    printed = train_through_script(  # the script's command, run in this process
        *script_settings(workdir, out), "--prefix_hidden_size", "16", "PREFIX_PROJECTION=true"
    )
    command = next(line for line in printed.splitlines() if line.startswith("+ "))
    assert "--prefix_projection true" in command and "--prefix_hidden_size 16" in command
    assert json.loads((out / "prefix_config.json").read_text())["prefix_hidden_size"] == 16


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_save_killed_midway_leaves_the_previous_checkpoint(workdir, tmp_path, monkeypatch):
    from transformers.trainer_utils import get_last_checkpoint

    from ptuning_v2.train import TuningTrainer

    original = TuningTrainer._save_rng_state

    def crash_on_second_save(self, output_dir):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("killed while writing checkpoint-2")
        return original(self, output_dir)

    monkeypatch.setattr(TuningTrainer, "_save_rng_state", crash_on_second_save)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        main(train_args(workdir, out, "--save_steps", "1", steps=3))
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")
    assert not (out / "checkpoint-2").exists()  # the half-written one stays out of sight
    model = load_model(str(workdir / "model"), ptuning_checkpoint=str(out / "checkpoint-1"))
    assert torch.isfinite(model.tuning.encoder.embedding.weight).all()
    # and training resumes from it
    monkeypatch.setattr(TuningTrainer, "_save_rng_state", original)
    main(train_args(workdir, out, "--save_steps", "1", "--resume_from_checkpoint", "true", steps=3))
    assert (out / "checkpoint-3").is_dir()


def test_evaluation_without_a_validation_file_is_refused(workdir, tmp_path):
    with pytest.raises(ValueError, match="need --validation_file"):
        main(train_args(workdir, tmp_path / "out", "--do_eval", steps=1))
