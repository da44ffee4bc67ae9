"""Data mixing (issue 24.2): general examples at a fixed share of every batch, seeded, continued exactly by a resumed
run, and every refusal before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ner_rows, train_args, write_jsonl
from tiny_models import save_tiny_backbone

from ptuning_v2 import mixing
from ptuning_v2.mixing import MixSampler, batch_shares
from ptuning_v2.train import main, parse_args

GENERAL = [
    {"content": "复述这句话：今天天气很好。", "summary": "今天天气很好。"},
    {"content": "他们到闹市区去", "summary": "狂欢，数新年钟声。"},
    {"content": "列出这句话里的动词：我们去北京。", "summary": "动词：去"},
    {"content": "复述这句话：这本书很好。", "summary": "这本书很好。"},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixing")
    rows = ner_rows()
    write_jsonl(root / "train.json", rows)
    write_jsonl(root / "dev.json", ner_rows(4, seed=1))
    write_jsonl(root / "general.json", GENERAL)
    texts = [r["content"] + r["summary"] for r in rows + GENERAL]
    save_tiny_backbone(root / "model", texts, initializer_range=0.2)
    return root


# ---------------------------------------------------------------- the share of every batch, seeded


@pytest.mark.parametrize(
    ("batch", "ratio", "task"), [(16, 0.2, 203), (4, 0.25, 50), (8, 0.05, 97), (16, 0.6, 40)]
)
def test_every_batch_holds_the_share_and_every_task_example_once(batch, ratio, task):
    sampler = MixSampler(task, 7, batch, ratio, seed=3)
    batches = sampler.batches()
    assert [i for b in batches for i in b] == list(sampler) and len(sampler) == len(list(sampler))
    assert sorted(i for b in batches for i in b if i < task) == list(range(task))  # each task example once
    mixed = [sum(i >= task for i in b) for b in batches]
    assert all(task <= i < task + 7 for b in batches for i in b if i >= task)
    for b, m in zip(batches[:-1], mixed):  # full batches: floor or ceil of B·r
        assert len(b) == batch and abs(m - batch * ratio) < 1
    assert abs(sum(mixed) / len(sampler) - ratio) <= 1 / batch  # over the epoch: the ratio
    assert mixed == batch_shares(batch, ratio, task)


def test_the_mix_is_seeded_by_the_run_and_the_epoch():
    one, same, other = (
        MixSampler(100, 9, 8, 0.25, 1),
        MixSampler(100, 9, 8, 0.25, 1),
        MixSampler(100, 9, 8, 0.25, 2),
    )
    assert list(one) == list(same) and list(one) != list(other)
    first = list(one)
    one.set_epoch(1)  # the Trainer's call at each epoch: another order, the same shares
    assert list(one) != first and [sum(i >= 100 for i in b) for b in one.batches()] == batch_shares(
        8, 0.25, 100
    )
    # mixed examples come each once before any repeats
    mixed = [i for i in first if i >= 100]
    assert all(len(set(mixed[k : k + 9])) == 9 for k in range(0, len(mixed) - 8, 9))


# ---------------------------------------------------------------- training: mixed batches, exact resume


def prefix_weights(directory: Path) -> torch.Tensor:
    return load_file(directory / "prefix_model.safetensors")["embedding.weight"]


def test_a_resumed_run_continues_the_same_mix(workdir, monkeypatch):
    seen: list[list[int]] = []
    batches = MixSampler.batches
    monkeypatch.setattr(MixSampler, "batches", lambda self: seen.append(b := batches(self)) or b)
    mix = ("--mix_file", str(workdir / "general.json"), "--mix_ratio", "0.25")
    common = (*mix, "--lr_scheduler_type", "constant", "--prefix_dropout", "0.2", "--learning_rate", "0.05")
    straight, resumed = workdir / "straight", workdir / "resumed"
    main(train_args(workdir, straight, *common, "--save_steps", "6", steps=12))
    assert seen and all(sum(i >= 16 for i in b) == 1 for b in seen[0][:-1])  # 1 of every 4 is general
    # 6 batches an epoch: the Trainer's set_epoch reached the sampler
    assert len(seen) == 2 and seen[0] != seen[1]
    record = json.loads((straight / "checkpoint-6" / mixing.MIX_RECORD).read_text())
    assert record["ratio"] == 0.25 and record["files"] == [str(workdir / "general.json")]
    # resumed in the middle of the first epoch (6 batches an epoch), and on across the second
    main(train_args(workdir, resumed, *common, steps=4))
    checkpoint = str(resumed / "checkpoint-4")
    main(train_args(workdir, resumed, *common, "--resume_from_checkpoint", checkpoint, steps=12))
    assert torch.allclose(prefix_weights(straight), prefix_weights(resumed), atol=1e-6, rtol=0)
    # a resume with another mix (or none) is refused before anything is loaded, naming both
    for other, expected in ((("--mix_ratio", "0.5"), "--mix_ratio 0.5"), ((), "this run has no mixing")):
        with pytest.raises(ValueError, match="was trained with --mix_ratio 0.25") as err:
            flags = [a for a in common if a not in mix] + (list(mix[:2]) + list(other) if other else [])
            main(
                train_args(
                    workdir, workdir / "other", *flags, "--resume_from_checkpoint", checkpoint, steps=12
                )
            )
        assert expected in str(err.value)


# ---------------------------------------------------------------- refusals


def refused(workdir: Path, out: Path, *flags: str) -> str:
    with pytest.raises(ValueError) as err:
        main(train_args(workdir, out, *flags, steps=2))
    assert not out.exists()  # nothing written
    return str(err.value)


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1", "nan"])
def test_a_ratio_outside_0_1_is_refused(workdir, tmp_path, no_loading, ratio):
    message = refused(
        workdir, tmp_path / "out", "--mix_file", str(workdir / "general.json"), "--mix_ratio", ratio
    )
    assert f"--mix_ratio {float(ratio):g}: must be in [0, 1)" in message


def test_a_mix_file_in_another_format_is_refused(workdir, tmp_path, no_loading):
    turns = [
        {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好"}]}
    ]
    other = write_jsonl(tmp_path / "chat.json", turns)
    message = refused(workdir, tmp_path / "out", "--mix_file", str(other), "--mix_ratio", "0.2")
    assert f"--mix_file {other}: its rows are in the 'conversations' format" in message
    assert "the task's --train_file in 'columns'" in message


@pytest.mark.parametrize("split", ["validation_file", "test_file"])
def test_a_mix_file_holding_dev_or_test_text_is_refused(workdir, tmp_path, no_loading, split):
    sentence = ner_rows(4, seed=1)[2]["content"].split("：", 1)[
        1
    ]  # the dev file's sentence, without the instruction
    leaky = write_jsonl(
        tmp_path / "leaky.json", [*GENERAL, {"content": "复述这句话：" + sentence, "summary": sentence}]
    )
    held_out = ["--do_eval"] if split == "validation_file" else ["--do_predict"]
    message = refused(
        workdir, tmp_path / "out", "--mix_file", str(leaky), "--mix_ratio", "0.2",
        f"--{split}", str(workdir / "dev.json"), *held_out,
    )  # fmt: skip
    assert f"--mix_file {leaky}:5 holds a text of --{split} {workdir / 'dev.json'}" in message


def test_other_mix_mistakes_are_refused(workdir, tmp_path, no_loading):
    general = str(workdir / "general.json")
    cases = [
        (("--mix_file", general), "with --mix_ratio 0 mixes nothing"),
        (("--mix_ratio", "0.2"), "--mix_ratio 0.2 needs --mix_file"),  # not the embedded backbone
        (("--mix_file", str(tmp_path / "none.json"), "--mix_ratio", "0.2"), "none.json' does not exist"),
        (("--mix_file", general, "--mix_ratio", "0.2", "--task_type", "seq_cls"), "--task_type seq_cls"),
    ]
    for flags, expected in cases:
        assert expected in refused(workdir, tmp_path / "out", *flags)


def test_the_embedded_backbone_mixes_the_bundled_chats_by_default(tmp_path):
    settings = parse_args(["--mix_ratio", "0.2", "--output_dir", str(tmp_path)])
    assert settings.data.mix_file == mixing.BUNDLED_MIX and settings.data.mix_files() == [mixing.BUNDLED_MIX]
    settings = parse_args(
        ["--mix_ratio", "0.2", "--model_name_or_path", "other", "--output_dir", str(tmp_path)]
    )
    assert settings.data.mix_file is None


def test_the_script_passes_the_mix_and_retention_keys(workdir, tmp_path):
    from test_train import run_script, script_settings

    general = workdir / "general.json"
    keys = (f"MIX_FILE={general}", "MIX_RATIO=0.25", "RETENTION=off", f"RETENTION_FILE={general}")
    result = run_script(*script_settings(workdir, tmp_path / "out"), *keys, "DRY_RUN=true")
    assert result.returncode == 0, result.stderr[-2000:]
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    assert f"--mix_file {general} --mix_ratio 0.25" in command
    assert f"--retention false --retention_file {general}" in command
