"""What a user can get wrong with the training and evaluation entry points: each is one clear error before anything
is loaded or written, or a loud stop naming the step, never a silent loss or a raw traceback (issue 11, point 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_runs import train_through_script
from test_train import ner_rows, train_args, write_jsonl
from tiny_models import save_tiny_backbone
from transformers.trainer_utils import get_last_checkpoint

import ptuning_v2.train as train_module
from ptuning_v2.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    rows = ner_rows()
    write_jsonl(root / "train.json", rows)
    texts = [r["content"] + r["summary"] for r in rows] + ["正面负面无"]
    save_tiny_backbone(root / "model", texts, initializer_range=0.2)
    return root


def run(
    script: str, *args: str, env: dict | None = None, drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for name in drop:
        environment.pop(name, None)
    command = ["bash", str(ROOT / script)] if script.endswith(".sh") else [sys.executable, "-m", script]
    return subprocess.run(
        [*command, *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )


def script_settings(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"MODEL={workdir / 'model'}",
        f"TRAIN_FILE={workdir / 'train.json'}",
        "VALIDATION_FILE=",
        f"OUTPUT_DIR={out}",
        "PRE_SEQ_LEN=4",
        "MAX_STEPS=2",
        "SAVE_STEPS=2",
        "BATCH_SIZE=4",
        "LR=0.1",
        "MAX_SOURCE_LENGTH=32",
        "MAX_TARGET_LENGTH=32",
        "RETENTION=false",  # these runs are about output directories and processes; test_retention scores it
        *extra,
        "--report_to",
        "none",
    ]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one ``error:`` line on stderr and no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def steps_of(directory: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in directory.glob("checkpoint-*"))


# ---------------------------------------------------------------- 1. an output directory holding an earlier run


def test_second_run_into_a_used_output_dir_is_refused(workdir, tmp_path):
    out = tmp_path / "run"
    main(train_args(workdir, out, "--save_steps", "1", steps=2))
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError) as err:
        main(train_args(workdir, out, "--learning_rate", "0.01", steps=2))
    message = str(err.value)
    assert str(out) in message and "checkpoint-1" in message and "prefix_model.safetensors" in message
    assert "RESUME=true" in message and "OVERWRITE=true" in message
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched


def test_overwrite_moves_the_earlier_run_aside(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    main(train_args(workdir, out, "--save_steps", "2", "--save_total_limit", "3", steps=6))
    old_final = (out / "prefix_model.safetensors").read_bytes()
    main(
        train_args(
            workdir,
            out,
            "--save_steps",
            "2",
            "--save_total_limit",
            "3",
            "--overwrite_output_dir",
            "true",
            steps=4,
        )
    )
    assert "moved" in capsys.readouterr().out
    # the new run's checkpoints are all there, and only they: RESUME=true picks this run's last one
    assert steps_of(out) == [2, 4]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["max_steps"] == 4
    # the earlier run is kept whole beside it, out of the way of get_last_checkpoint and rotation
    (aside,) = out.glob("overwritten-*")
    assert steps_of(aside) == [2, 4, 6]
    assert (aside / "prefix_model.safetensors").read_bytes() == old_final
    assert (out / "prefix_model.safetensors").read_bytes() != old_final


def test_rotation_never_deletes_this_runs_checkpoint_to_keep_another_runs(tmp_path):
    from ptuning_v2.train import rotate_run_checkpoints

    for step in (2, 4, 6, 8):  # 6 and 8 from some other run, 2 and 4 from this one (now at step 4)
        (tmp_path / f"checkpoint-{step}").mkdir()
    rotate_run_checkpoints(str(tmp_path), limit=1, step=4)
    assert steps_of(tmp_path) == [4, 6, 8]


@pytest.mark.slow
def test_script_refuses_a_used_output_dir_and_overwrites_on_request(workdir, tmp_path):
    out = tmp_path / "run"
    main(train_args(workdir, out, "--save_steps", "1", steps=2))
    refused = run("scripts/train_pt2.sh", *script_settings(workdir, out))
    line = one_error_line(refused)
    assert str(out) in line and "RESUME=true" in line and "OVERWRITE=true" in line
    assert steps_of(out) == [1, 2]
    done = train_through_script(*script_settings(workdir, out, "OVERWRITE=yes"))  # in this process
    assert "--overwrite_output_dir true" in done
    assert steps_of(out) == [2] and steps_of(next(out.glob("overwritten-*"))) == [1, 2]


# ---------------------------------------------------------------- 2. a saturated prefix, a vanished gradient


def test_absurd_learning_rate_stops_at_the_first_step(workdir, tmp_path):
    out = tmp_path / "lr"
    # the tiny backbone keeps a finite loss here, with a gradient ~1e-7: a saturated prefix, not a nan
    with pytest.raises(RuntimeError, match="saturated at step 1") as err:
        main(train_args(workdir, out, "--learning_rate", "1e6", "--save_steps", "1", steps=6))
    assert type(err.value).__name__ == "SaturatedError"
    assert not list(out.glob("checkpoint-*")) and not (out / "prefix_model.safetensors").exists()


def test_bundled_model_with_lr_1e30_stops_naming_the_step(tmp_path):
    # The user's report: LR=1e30 on the bundled model gave a flat loss, a gradient of exactly 0 from step 2, exit 0
    # and a prefix of magnitude 1e30.
    data = write_jsonl(tmp_path / "train.json", ner_rows(8))
    out = tmp_path / "out"
    result = run(
        "scripts/train_pt2.sh",
        f"TRAIN_FILE={data}",
        "VALIDATION_FILE=",
        f"OUTPUT_DIR={out}",
        "PRE_SEQ_LEN=8",
        "MAX_STEPS=4",
        "BATCH_SIZE=2",
        "MAX_SOURCE_LENGTH=32",
        "MAX_TARGET_LENGTH=16",
        "LR=1e30",
        "--report_to",
        "none",
    )
    line = one_error_line(result)
    assert "saturated at step 1" in line and "--max_prefix_weight" in line
    assert not (out / "prefix_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_vanished_gradient_stops_naming_the_step(workdir, tmp_path, monkeypatch):
    from ptuning_v2.train import SaturatedError

    build = train_module.build_model

    def with_zero_gradient(args):
        model = build(args)
        for parameter in model.tuning.encoder.parameters():
            parameter.register_hook(torch.zeros_like)
        return model

    monkeypatch.setattr(train_module, "build_model", with_zero_gradient)
    out = tmp_path / "zero"
    with pytest.raises(SaturatedError) as err:
        main(train_args(workdir, out, "--zero_grad_patience", "3", steps=8))
    assert "exactly 0 since step 1" in str(err.value) and "up to step 3" in str(err.value)


def test_inf_gradient_stops_before_clipping_hides_it(workdir, tmp_path):
    from ptuning_v2.train import NonFiniteError

    out = tmp_path / "inf"
    # lr 1e8 with the weight bound off: the gradient norm is 2e12 at step 2 and inf at step 3, which clipping would
    # turn into a zero update that the log shows only as grad_norm inf
    args = ("--learning_rate", "1e8", "--max_prefix_weight", "0", "--save_steps", "1", "--max_grad_norm", "1")
    with pytest.raises(NonFiniteError, match="gradient norm is inf") as err:
        main(train_args(workdir, out, *args, steps=6))
    assert "at step 3" in str(err.value)
    for checkpoint in out.glob("checkpoint-*"):
        assert torch.isfinite(load_file(checkpoint / "prefix_model.safetensors")["embedding.weight"]).all()


# ---------------------------------------------------------------- 3. a model directory that does not exist


@pytest.mark.parametrize("entry", ["ptuning_v2.train", "ptuning_v2.evaluate"])
def test_missing_model_directory_is_one_error_line(workdir, tmp_path, entry):
    missing = tmp_path / "no" / "such" / "model"
    common = ["--output_dir", str(tmp_path / "out")]
    if entry == "ptuning_v2.train":
        args = [
            "--model_name_or_path",
            str(missing),
            "--train_file",
            str(workdir / "train.json"),
            "--do_train",
        ]
    else:
        args = ["--model", str(missing), "--test_file", str(workdir / "train.json")]
    # online, as the user ran it: Hugging Face's own error would be about a malformed repo id
    result = run(entry, *args, *common, drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    line = one_error_line(result)
    assert str(missing) in line and "does not exist" in line and "Repo id" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_model_path_check_leaves_hub_ids_to_the_hub(monkeypatch, tmp_path):
    from ptuning_v2.loading import check_model_path

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_model_path("THUDM/chatglm3-6b")  # a Hub id: the Hub decides
    for local in (str(tmp_path / "x"), "./models/none", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            check_model_path(local)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        check_model_path("THUDM/chatglm3-6b")


# ---------------------------------------------------------------- 4. bad numbers and files, found before training


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max_eval_samples", "-1"),
        ("--max_train_samples", "0"),
        ("--pre_seq_len", "0"),
        ("--max_source_length", "0"),
        ("--max_target_length", "-5"),
        ("--max_new_tokens", "0"),
        ("--per_device_train_batch_size", "0"),
        ("--per_device_eval_batch_size", "-1"),
        ("--gradient_accumulation_steps", "0"),
        ("--save_steps", "0"),
        ("--max_steps", "0"),
        ("--learning_rate", "0"),
        ("--learning_rate", "-0.1"),
        ("--prefix_dropout", "1.5"),
        ("--method", "adapters"),
        ("--quantization_bit", "3"),
        ("--torch_dtype", "fp8"),
        ("--task", "translation"),
        ("--top_p", "0"),
        ("--temperature", "0"),
        ("--eval_generate_steps", "-2"),
        ("--max_prefix_weight", "-1"),
    ],
)
def test_bad_setting_is_refused_before_loading(workdir, tmp_path, no_loading, flag, value):
    out = tmp_path / "out"
    extra = ("--validation_file", str(workdir / "train.json"), "--do_eval")
    with pytest.raises(ValueError) as err:
        main(train_args(workdir, out, *extra, flag, value, steps=2))
    assert f"{flag} {value}" in str(err.value) or f"{flag} '{value}'" in str(err.value)
    assert not out.exists()  # nothing written


def test_every_bad_setting_is_listed_at_once(workdir, tmp_path, no_loading):
    with pytest.raises(ValueError) as err:
        main(train_args(workdir, tmp_path / "out", "--pre_seq_len", "0", "--max_eval_samples", "-1", steps=2))
    assert "--pre_seq_len 0" in str(err.value) and "--max_eval_samples -1" in str(err.value)
    assert str(err.value).count("\nerror: ") == 1  # printed as one "error:" line each


@pytest.mark.parametrize(
    "which", ["directory", "missing_validation", "missing_checkpoint", "output_is_a_file"]
)
def test_bad_paths_are_refused_before_loading(workdir, tmp_path, no_loading, which):
    out, extra = tmp_path / "out", []
    train_file = None
    if which == "directory":
        train_file, expected = tmp_path, "is a directory"
    elif which == "missing_validation":
        extra, expected = (
            ["--validation_file", str(tmp_path / "dev.json"), "--do_eval"],
            "dev.json' does not exist",
        )
    elif which == "missing_checkpoint":
        extra, expected = ["--ptuning_checkpoint", str(tmp_path / "prefix")], "prefix' does not exist"
    else:
        out.write_text("not a directory")
        expected = "is a file, not a directory"
    with pytest.raises(ValueError, match=expected):
        main(train_args(workdir, out, *extra, train_file=train_file, steps=2))


def test_non_numeric_flag_is_one_line_without_the_usage(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(train_args(workdir, tmp_path / "out", "--learning_rate", "fast"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and err.count("\n") == 1
    assert "--learning_rate" in err and "'fast'" in err


def test_evaluate_refuses_bad_counts_before_loading(workdir, tmp_path, capsys):
    from ptuning_v2.evaluate import main as evaluate_main

    args = ["--model", str(workdir / "model"), "--test_file", str(workdir / "train.json")]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(
            [*args, "--output_dir", str(tmp_path / "out"), "--max_samples", "-1", "--batch_size", "0"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --max_samples -1" in err and "error: --batch_size 0" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 5. script settings: numbers and booleans


def script_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = one_error_line(result)
    assert all(text in line for text in expected), line
    assert "+ python" not in result.stdout and "+ torchrun" not in result.stdout  # refused before running


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("NUM_GPUS=foo", "NUM_GPUS must be a whole number >= 1, got 'foo'"),
        ("NUM_GPUS=0", "NUM_GPUS"),
        ("MAX_EVAL_SAMPLES=-1", "MAX_EVAL_SAMPLES must be a whole number >= 1, got '-1'"),
        ("LR=abc", "LR must be a number above 0, got 'abc'"),
        ("LR=-1e-2", "LR"),
        ("LR=0", "LR"),
        ("SAVE_STEPS=0", "SAVE_STEPS"),
        ("MAX_STEPS=0", "MAX_STEPS"),
        ("BATCH_SIZE=-2", "BATCH_SIZE"),
        ("PRE_SEQ_LEN=1.5", "PRE_SEQ_LEN"),
        ("MASTER_PORT=http", "MASTER_PORT"),
        ("PREFIX_DROPOUT=high", "PREFIX_DROPOUT"),
        (
            "METHOD=adapters",
            "METHOD must be one of: ptuning_v2 prefix_tuning ptuning_v1 prompt_tuning residual_prompt_tuning lora full; "
            "got 'adapters'",
        ),
        ("QUANTIZATION_BIT=3", "QUANTIZATION_BIT must be one of: none 4 8; got '3'"),
        ("PREFIX_PROJECTION=maybe", "PREFIX_PROJECTION must be true or false"),
        ("COMPARE_WITH_BASE=2", "COMPARE_WITH_BASE"),
        ("OVERWRITE=please", "OVERWRITE must be true or false"),
        ("TRAIN_FILE={tmp}", "is a directory, not a file"),
        ("VALIDATION_FILE={tmp}/dev.json", "dev.json: no such file"),
        ("DS_CONFIG={tmp}/ds.json", "DS_CONFIG"),
        ("RESUME={tmp}/checkpoint-9", "RESUME"),
        ("RETENTION=maybe", "RETENTION must be true or false"),
        ("RETENTION_FILE={tmp}/general.jsonl", "general.jsonl: no such file"),
        ("MIX_RATIO=1", "MIX_RATIO must be a number in [0, 1)"),
        ("MIX_RATIO=-0.1", "MIX_RATIO must be a number in [0, 1)"),
        ("MIX_RATIO=much", "MIX_RATIO must be a number in [0, 1)"),
        ("MIX_FILE={tmp}/general.json", "MIX_FILE={tmp}/general.json: no such file"),
    ],
)
def test_train_script_refuses_bad_settings(workdir, tmp_path, setting, expected):
    out = tmp_path / "out"
    setting, expected = setting.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    result = run("scripts/train_pt2.sh", *script_settings(workdir, out), setting)
    script_error(result, expected, setting.split("=", 1)[0])
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("MAX_SAMPLES=-1", "MAX_SAMPLES must be a whole number >= 1, got '-1'"),
        ("BATCH_SIZE=0", "BATCH_SIZE"),
        ("DO_SAMPLE=sometimes", "DO_SAMPLE must be true or false"),
        ("TOP_P=1.5", "TOP_P"),
        ("TEMPERATURE=-1", "TEMPERATURE"),
        ("TASK=translation", "TASK"),
        ("BLEU=tokens", "BLEU"),
        ("QUANTIZATION_BIT=2", "QUANTIZATION_BIT"),
        ("CHECKPOINT={tmp}/none", "CHECKPOINT"),
        ("TEST_FILE={tmp}/none.json", "TEST_FILE"),
        ("RETENTION=sometimes", "RETENTION must be true or false"),
        ("RETENTION_FILE={tmp}/general.txt", "RETENTION_FILE"),
    ],
)
def test_evaluate_script_refuses_bad_settings(workdir, tmp_path, setting, expected):
    out = tmp_path / "eval"
    args = [f"MODEL={workdir / 'model'}", f"TEST_FILE={workdir / 'train.json'}", f"OUTPUT_DIR={out}"]
    result = run("scripts/evaluate.sh", *args, setting.format(tmp=tmp_path))
    script_error(result, expected)
    assert not out.exists()


def test_script_booleans_take_the_usual_spellings(workdir, tmp_path):
    # A run that fails fast (no such model) after printing the command it was given.
    settings = [*script_settings(workdir, tmp_path / "out"), f"MODEL={tmp_path / 'none' / 'model'}"]
    result = run(
        "scripts/train_pt2.sh", *settings, "PREFIX_PROJECTION=On", "COMPARE_WITH_BASE=0", "OVERWRITE=YES"
    )
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert "--prefix_projection true" in command and "--overwrite_output_dir true" in command
    one_error_line(result)  # the missing model, in one line
    result = run(
        "scripts/evaluate.sh",
        f"MODEL={tmp_path / 'none' / 'model'}",
        f"TEST_FILE={workdir / 'train.json'}",
        f"OUTPUT_DIR={tmp_path / 'eval'}",
        "DO_SAMPLE=1",
    )
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert "--do_sample true" in command


def test_python_boolean_flags_take_the_usual_spellings(capsys):
    from ptuning_v2.evaluate import parse_args as evaluate_args
    from ptuning_v2.train import parse_args

    settings = parse_args(
        ["--do_sample", "On", "--prefix_projection", "YES", "--compare_with_base", "0", "--output_dir", "o"]
    )
    assert settings.generation.do_sample and settings.method.prefix_projection
    assert not settings.data.compare_with_base and not settings.training.overwrite_output_dir
    base = ["--model", "models/glm-zh-tiny", "--test_file", __file__, "--output_dir", "o"]
    assert evaluate_args([*base, "--do_sample"])[1].do_sample is True
    assert evaluate_args([*base, "--do_sample", "1"])[1].do_sample is True
    assert evaluate_args([*base, "--do_sample", "off"])[1].do_sample is False
    with pytest.raises(SystemExit):
        parse_args(["--do_sample", "maybe", "--output_dir", "o"])
    assert "expected true or false" in capsys.readouterr().err


# ---------------------------------------------------------------- 6. resuming with another schedule


def test_resume_with_another_max_steps_warns_naming_both(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    main(train_args(workdir, out, "--save_steps", "3", steps=6))
    capsys.readouterr()
    main(train_args(workdir, out, "--save_steps", "3", "--resume_from_checkpoint", "true", steps=9))
    err = capsys.readouterr().err
    assert (
        "warning:" in err and "--max_steps 6" in err and "--max_steps 9" in err and "jumps at step 6" in err
    )
    assert "MAX_STEPS=6" in err


def test_resume_at_or_past_max_steps_is_refused(workdir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    main(train_args(workdir, out, "--save_steps", "3", steps=6))
    final = (out / "prefix_model.safetensors").read_bytes()
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="at step 6 and --max_steps is 4: nothing is left to train"):
        main(train_args(workdir, out, "--resume_from_checkpoint", "true", steps=4))
    assert (out / "prefix_model.safetensors").read_bytes() == final


# ---------------------------------------------------------------- 7. resume mistakes


def test_resume_from_a_missing_checkpoint_is_refused_before_loading(workdir, tmp_path, no_loading):
    with pytest.raises(ValueError, match="checkpoint-7'?: no such checkpoint directory"):
        main(train_args(workdir, tmp_path / "a", "--resume_from_checkpoint", str(tmp_path / "checkpoint-7")))
    with pytest.raises(ValueError, match="holds no checkpoint-N folder"):
        main(train_args(workdir, tmp_path / "b", "--resume_from_checkpoint", "true"))
    prefix_only = tmp_path / "prefix"
    prefix_only.mkdir()
    with pytest.raises(ValueError, match="not a training checkpoint"):
        main(train_args(workdir, tmp_path / "c", "--resume_from_checkpoint", str(prefix_only)))


def test_resuming_an_earlier_checkpoint_moves_the_later_ones_aside(workdir, tmp_path):
    out = tmp_path / "run"
    main(train_args(workdir, out, "--save_steps", "2", steps=6))
    old_six = (out / "checkpoint-6" / "prefix_model.safetensors").read_bytes()
    main(
        train_args(
            workdir,
            out,
            "--save_steps",
            "2",
            "--prefix_dropout",  # the optimizer and schedule come back from checkpoint-2; dropout makes a new branch
            "0.3",
            "--resume_from_checkpoint",
            str(out / "checkpoint-2"),
            steps=6,
        )
    )
    (aside,) = out.glob("superseded-*")
    assert (
        steps_of(aside) == [4, 6]
        and (aside / "checkpoint-6" / "prefix_model.safetensors").read_bytes() == old_six
    )
    assert steps_of(out) == [2, 4, 6]
    assert (out / "checkpoint-6" / "prefix_model.safetensors").read_bytes() != old_six
