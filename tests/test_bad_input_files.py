"""Bad input files a user can hand us (issue 11, point 6): each is a clear error naming the file (and the line,
field or tensor), never a silent loss or a raw traceback.

Prefix checkpoints (ours, official ChatGLM, PEFT), data files, prediction files for evaluate/rouge.py, and
``python -m ptuning_v2.convert``'s SRC and DST.
"""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_chatglm import TINY_CHATGLM, make_chatglm_weights, write_checkpoint
from tiny_models import tiny_model

from ptuning_v2 import PrefixConfig, attach_prefix, export_peft_adapter, load_model, load_prefix_checkpoint
from ptuning_v2.data import DataConfig, load_conversations, tokenize_for_generation, tokenize_for_training

REPO = Path(__file__).resolve().parents[1]
P = 4
OFFICIAL = "transformer.prefix_encoder."


def prefixed(projection: bool = False):
    model = tiny_model("glm")
    attach_prefix(model, PrefixConfig(pre_seq_len=P, prefix_projection=projection, prefix_dropout=0.0))
    torch.manual_seed(1)
    for param in model.tuning.encoder.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.fixture
def ours(tmp_path) -> Path:
    """A good checkpoint in our format, with the projection MLP."""
    directory = tmp_path / "ckpt"
    prefixed(projection=True).tuning.save(directory)
    return directory


def _edit_config(directory: Path, edit) -> Path:
    path = directory / "prefix_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return path


@contextmanager
def _raises_naming(path: Path, *fragments: str, error: type[Exception] = ValueError):
    """pytest.raises(error), and its message names ``path`` and holds every fragment."""
    with pytest.raises(error) as info:
        yield info
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------- our prefix format


def test_corrupted_prefix_bytes_are_refused_not_loaded_as_nan(ours, tmp_path):
    """The reported case: the tensor bytes of prefix_model.safetensors were corrupted; loading gave NaN weights
    and evaluate.sh then exited 0 with every prediction empty. Now loading refuses, naming file and tensor."""
    weights = ours / "prefix_model.safetensors"
    raw = bytearray(weights.read_bytes())
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[header:] = b"\xff\xff\xff\x7f" * ((len(raw) - header) // 4)  # every float32 becomes NaN
    weights.write_bytes(bytes(raw))
    with _raises_naming(weights, "non-finite", "NaN"):
        load_prefix_checkpoint(ours)
    # evaluate.py and train.py load through load_model, which now stops with the same message.
    tiny_model("glm").save_pretrained(tmp_path / "base")
    with _raises_naming(weights, "non-finite"):
        load_model(str(tmp_path / "base"), ptuning_checkpoint=str(ours))


def test_truncated_prefix_weights_name_the_file(ours):
    weights = ours / "prefix_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with _raises_naming(weights, "truncated or corrupt"):
        load_prefix_checkpoint(ours)
    weights.write_bytes(b"")
    with _raises_naming(weights, "truncated or corrupt"):
        load_prefix_checkpoint(ours)


@pytest.mark.parametrize(
    "change, fragments",
    [
        ("rows", ["'embedding.weight' has shape (5, 64)", "implies (4, 64)", "pre_seq_len=4"]),
        ("drop", ["missing tensor(s) ['trans.2.bias']"]),
        ("extra", ["unexpected tensor(s) ['bogus.weight']"]),
        ("int", ["'trans.0.bias' has dtype int64", "floating point"]),
        ("inf", ["'trans.2.weight' holds 1 non-finite value(s)"]),
    ],
)
def test_prefix_tensors_are_checked_against_the_config(ours, change, fragments):
    weights = ours / "prefix_model.safetensors"
    state = load_file(weights)
    if change == "rows":
        state["embedding.weight"] = torch.zeros(5, 64)
    elif change == "drop":
        del state["trans.2.bias"]
    elif change == "extra":
        state["bogus.weight"] = torch.zeros(2)
    elif change == "int":
        state["trans.0.bias"] = state["trans.0.bias"].long()
    else:
        state["trans.2.weight"][0, 0] = float("inf")
    save_file(state, weights)
    with _raises_naming(weights, *fragments):
        load_prefix_checkpoint(ours)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (
            lambda m: m.update(prefix_projection="false"),
            ["'prefix_projection' must be true or false", '"false"'],
        ),
        (lambda m: m.update(pre_seq_len="4"), ["'pre_seq_len' must be a positive integer", '"4"']),
        (lambda m: m.update(pre_seq_len=4.0), ["'pre_seq_len' must be a positive integer"]),
        (lambda m: m.pop("pre_seq_len"), ["missing field 'pre_seq_len'"]),
        (lambda m: m.update(prefix_dropout="0.1"), ["'prefix_dropout' must be a number in [0, 1)"]),
        (lambda m: m.update(prefix_hidden_size=0), ["'prefix_hidden_size' must be a positive integer"]),
        (lambda m: m.update(position_convention="glm"), ["'position_convention' must be"]),
        (lambda m: m["kv_shape"].pop("num_layers"), ["kv_shape: missing field 'num_layers'"]),
        (lambda m: m["kv_shape"].update(kv_size=99), ["kv_shape.kv_size is 99", "= 64"]),
        (lambda m: m.update(kv_shape=[2, 2, 8, 32]), ["'kv_shape' must be an object, got array"]),
        (lambda m: m.update(format_version=2), ["format_version 2 was written by a newer ptuning_v2"]),
        (lambda m: m.update(format="peft"), ["field 'format' is \"peft\""]),
    ],
)
def test_prefix_config_fields_are_checked(ours, edit, fragments):
    config = _edit_config(ours, edit)
    with _raises_naming(config, *fragments):
        load_prefix_checkpoint(ours)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"pre_seq_len": 4,', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got array"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_unreadable_prefix_config_names_the_file(ours, content, fragment):
    config = ours / "prefix_config.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    with _raises_naming(config, fragment):
        load_prefix_checkpoint(ours)


def test_weights_file_given_instead_of_the_directory(ours):
    weights = ours / "prefix_model.safetensors"
    with _raises_naming(weights, "is a file", f"pass the directory holding it, {ours}"):
        load_prefix_checkpoint(weights)


def test_weights_without_their_config(ours):
    (ours / "prefix_config.json").unlink()
    with _raises_naming(
        ours, "has prefix_model.safetensors but no prefix_config.json", error=FileNotFoundError
    ):
        load_prefix_checkpoint(ours)


# ------------------------------------------------------------------------------- official ChatGLM format


def _official(
    directory: Path, projection: bool = False, config: dict | None = None, fmt: str = "bin"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {OFFICIAL + k: v.clone() for k, v in prefixed(projection).tuning.encoder.state_dict().items()}
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, directory / "model.safetensors")
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_official_checkpoint_with_nan_is_refused(tmp_path):
    directory = _official(tmp_path / "pt")
    weights = directory / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    state[OFFICIAL + "embedding.weight"][1, 3] = float("nan")
    torch.save(state, weights)
    with _raises_naming(weights, "'embedding.weight' holds 1 non-finite value(s)"):
        load_prefix_checkpoint(directory)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_official_checkpoint_names_the_file(tmp_path, fmt):
    directory = _official(tmp_path / "pt", fmt=fmt)
    weights = directory / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:200])
    with _raises_naming(weights, "truncated"):
        load_prefix_checkpoint(directory)


@pytest.mark.parametrize(
    "config, fragments",
    [
        # the type is named, instead of "pre_seq_len=4 but ... has 4 rows"
        ({"pre_seq_len": "4"}, ["'pre_seq_len' must be a positive integer", '"4"']),
        # bool("false") is True: this used to claim the config asked for a projection
        ({"prefix_projection": "false"}, ["'prefix_projection' must be true or false"]),
        ({"pre_seq_len": 128}, ["says pre_seq_len=128", "has 4 rows"]),
        # the geometry of config.json gives kv_size 2*2*4*16 = 256, the table is 64 wide
        (
            {**TINY_CHATGLM, "num_attention_heads": 4, "multi_query_group_num": 4},
            ["implies kv_size=256", "is 64 wide"],
        ),
    ],
)
def test_official_config_disagreeing_with_the_weights(tmp_path, config, fragments):
    directory = _official(tmp_path / "pt", config=config)
    with _raises_naming(directory / "config.json", *fragments):
        load_prefix_checkpoint(directory)


def test_official_config_that_is_not_an_object(tmp_path):
    directory = _official(tmp_path / "pt")
    (directory / "config.json").write_text("[]")
    with _raises_naming(directory / "config.json", "expected a JSON object"):
        load_prefix_checkpoint(directory)


def test_official_projection_with_inconsistent_mlp(tmp_path):
    directory = _official(tmp_path / "pt", projection=True)
    weights = directory / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    state[OFFICIAL + "trans.2.bias"] = torch.zeros(63)
    torch.save(state, weights)
    with _raises_naming(weights, "'trans.2.bias' has shape (63,)", "implies (64,)"):
        load_prefix_checkpoint(directory)


# ------------------------------------------------------------------------------------------ PEFT adapters


@pytest.fixture
def peft_dir(tmp_path) -> Path:
    directory = tmp_path / "adapter"
    export_peft_adapter(prefixed(), directory)
    return directory


CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.mark.parametrize(
    "edit, named, fragments",
    [
        (lambda m: m.pop("num_layers"), CONFIG, ["missing field 'num_layers'"]),
        (lambda m: m.pop("token_dim"), CONFIG, ["missing field 'token_dim'"]),
        (lambda m: m.update(num_layers="2"), CONFIG, ["'num_layers' must be a positive integer", '"2"']),
        (lambda m: m.update(num_attention_heads=3), CONFIG, ["token_dim=16 is not a multiple of"]),
        (lambda m: m.pop("peft_type"), CONFIG, ["missing field 'peft_type'"]),
        (lambda m: m.update(num_virtual_tokens=8), WEIGHTS, ["has shape (4, 64)", "implies (8, 64)"]),
    ],
)
def test_peft_adapter_config_is_checked(peft_dir, edit, named, fragments):
    path = peft_dir / CONFIG
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with _raises_naming(peft_dir / named, *fragments):
        load_prefix_checkpoint(peft_dir)


def test_peft_adapter_weights_nan_or_truncated(peft_dir):
    weights = peft_dir / "adapter_model.safetensors"
    state = load_file(weights)
    state["prompt_embeddings"][0, 0] = float("nan")
    save_file(state, weights)
    with _raises_naming(weights, "non-finite"):
        load_prefix_checkpoint(peft_dir)
    weights.write_bytes(weights.read_bytes()[:100])
    with _raises_naming(weights, "truncated or corrupt"):
        load_prefix_checkpoint(peft_dir)


# ------------------------------------------------------------------------------------------- data files


def _load(path: Path, config: DataConfig | None = None):
    return load_conversations(str(path), config or DataConfig(), cache_dir=str(path.parent / "cache"))


def test_non_utf8_data_names_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    rows = ['{"content": "q", "summary": "a"}', '{"content": "类型#裙", "summary": "好看"}']
    path.write_bytes(("\n".join(rows) + "\n").encode("gbk"))
    # line 2: {"content": " is 13 characters, so the first GBK byte of 类 is column 14
    with _raises_naming(path, f"{path}:2:", "line 2, column 14", "GB18030", "iconv"):
        _load(path)


def test_utf16_data_file_is_named_as_such(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes('{"content": "问", "summary": "答"}\n'.encode("utf-16"))
    with _raises_naming(path, "UTF-16", "save it as UTF-8"):
        _load(path)


def test_utf8_bom_loads_and_is_not_counted_as_a_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + '{"content": "问", "summary": "答"}\n'.encode())
    assert len(_load(path)) == 1
    path.write_bytes(b"\xef\xbb\xbf" + b'{"content": "\xff"}\n')
    with _raises_naming(path, f"{path}:1:", "line 1, column 14"):
        _load(path)


@pytest.fixture(scope="module")
def tokenizer():
    from test_data import CHATGLM3_TEMPLATE, _make_tokenizer

    return _make_tokenizer(CHATGLM3_TEMPLATE)


def test_all_empty_responses_name_the_file_and_column(tmp_path, tokenizer):
    path = tmp_path / "train.json"
    path.write_text('{"content": "问", "answer": "答", "summary": ""}\n' * 3, encoding="utf-8")
    dataset = _load(path)
    with _raises_naming(path, "every example was dropped", "'summary' (response_column)", "all 3 examples"):
        tokenize_for_training(dataset, tokenizer, DataConfig())
    # through select() too, as train.py's --max_samples does
    with _raises_naming(path, "every example was dropped"):
        tokenize_for_training(dataset.select([0, 1]), tokenizer, DataConfig())


def test_all_empty_final_turns_name_the_file(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": " "}]}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with _raises_naming(path, "every example was dropped", "final assistant turn of each 'messages' list"):
        tokenize_for_training(_load(path), tokenizer, DataConfig())


def test_all_empty_references_warn_at_evaluation(tmp_path, tokenizer, caplog):
    path = tmp_path / "dev.json"
    path.write_text('{"content": "问", "summary": ""}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="ptuning_v2.data"):
        tokenize_for_generation(_load(path), tokenizer, DataConfig())
    assert f"{path}: every reference is empty" in caplog.text


def test_json_list_in_a_jsonl_file_loads(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('[\n {"content": "一", "summary": "二"},\n {"content": "三", "summary": "四"}\n]\n')
    assert [m[1]["content"] for m in _load(path)["messages"]] == ["二", "四"]


def test_pretty_printed_single_object_is_explained(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": [{"content": "一", "summary": "二"}]}, indent=2, ensure_ascii=False))
    with _raises_naming(path, f"{path}:1:", "single JSON object", "field 'data' holds a list of 1 objects"):
        _load(path)


def test_row_that_is_not_an_object_in_a_list_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n {"content": "一", "summary": "二"},\n "三"\n]\n', encoding="utf-8")
    with _raises_naming(path, f"{path}:3: expected a JSON object", '"三"'):
        _load(path)


def test_missing_prompt_column_on_line_n_names_the_setting(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"content": "一", "summary": "二"}\n{"prompt": "三", "summary": "四"}\n')
    with _raises_naming(path, f"{path}:2: missing column 'content' (named by the prompt_column setting)"):
        _load(path)
    with _raises_naming(path, f"{path}:1: missing column 'answer' (named by the response_column setting)"):
        _load(path, DataConfig(response_column="answer"))


# ------------------------------------------------------------------------------------- evaluate/rouge.py


def _predictions(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"labels": label, "predict": pred}, ensure_ascii=False) for pred, label in pairs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rouge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "evaluate/rouge.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_rouge_refuses_files_with_different_pair_counts(tmp_path):
    first = _predictions(tmp_path / "a" / "p.txt", [("正面", "正面"), ("负面", "负面"), ("正面", "负面")])
    second = _predictions(tmp_path / "b" / "p.txt", [("正面", "正面"), ("负面", "负面")])
    result = _rouge("--predictions", str(first), str(second))
    assert result.returncode == 2
    assert f"{first} holds 3 pairs but {second} holds 2" in result.stderr
    assert "--allow-different-sets" in result.stderr and "Traceback" not in result.stderr
    allowed = _rouge("--predictions", str(first), str(second), "--allow-different-sets")
    assert allowed.returncode == 0, allowed.stderr
    assert "warning" in allowed.stderr and "holds 3 pairs" in allowed.stderr


def test_rouge_refuses_files_with_different_labels(tmp_path):
    first = _predictions(tmp_path / "a" / "p.txt", [("正面", "正面"), ("负面", "负面")])
    second = _predictions(tmp_path / "b" / "p.txt", [("正面", "正面"), ("负面", "正面")])
    result = _rouge("--predictions", str(first), str(second))
    assert result.returncode == 2
    assert (
        f"{first} and {second} both hold 2 pairs but 1 of their labels differ, first at pair 2"
        in result.stderr
    )


def test_rouge_warns_when_every_prediction_is_empty(tmp_path):
    path = _predictions(tmp_path / "p.txt", [("", "正面"), ("  ", "负面")])
    result = _rouge("--predictions", str(path))
    assert result.returncode == 0
    assert f"{path}: all 2 predictions are empty" in result.stderr


def test_rouge_given_the_data_file_instead_of_predictions(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text('{"content": "问", "summary": "答"}\n', encoding="utf-8")
    result = _rouge("--predictions", str(path))
    assert result.returncode == 2
    assert f"{path}:1: missing key 'labels'" in result.stderr
    assert "generated_predictions.txt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "no such file"),
        ("", "no predictions"),
        ('{"labels": "a", "predict": "a"}\n{bad\n', ":2: bad JSON"),
    ],
)
def test_rouge_missing_empty_or_bad_file(tmp_path, content, fragment):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = _rouge("--predictions", str(path))
    assert result.returncode == 2 and str(path) in result.stderr and fragment in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ ptuning_v2.convert


@pytest.fixture(scope="module")
def chatglm_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    return write_checkpoint(root / "bin", TINY_CHATGLM, make_chatglm_weights(TINY_CHATGLM), "bin")


def _convert(*args: str):
    from ptuning_v2.convert import main

    return main([str(a) for a in args])


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_convert_into_an_existing_empty_directory(chatglm_src, tmp_path):
    dst = tmp_path / "native"
    dst.mkdir()
    assert _convert(chatglm_src, dst) == 0
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_convert_refuses_a_non_empty_directory_clearly(chatglm_src, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as info:
        _convert(chatglm_src, dst)
    assert f"{dst} already exists and is not empty (it holds notes.txt)" in str(info.value)
    assert "--overwrite" in str(info.value)
    assert (dst / "notes.txt").read_text() == "keep me" and _leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    weights = make_chatglm_weights(TINY_CHATGLM)
    del weights["transformer.output_layer.weight"]  # found missing only after the shards are written
    src = write_checkpoint(tmp_path / "src", TINY_CHATGLM, weights, "safetensors-sharded")
    dst = tmp_path / "new" / "deeper" / "native"
    with pytest.raises(SystemExit, match="transformer.output_layer.weight"):
        _convert(src, dst)
    assert not (tmp_path / "new").exists(), "parent directories made for DST were left behind"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        _convert(src, empty)
    assert empty.is_dir() and list(empty.iterdir()) == [] and _leftovers(tmp_path) == []


def test_convert_refuses_to_overwrite_its_own_source(chatglm_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for file in chatglm_src.iterdir():
        (src / file.name).write_bytes(file.read_bytes())
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, tmp_path):
        with pytest.raises(SystemExit, match="would destroy the source"):
            _convert(src, dst, "--overwrite")
    assert sorted(p.name for p in src.iterdir()) == before


def test_convert_truncated_source_names_the_file(chatglm_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((chatglm_src / "config.json").read_text())
    weights = (chatglm_src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(SystemExit) as info:
        _convert(src, tmp_path / "out")
    assert f"{src / 'pytorch_model.bin'}: cannot read this weights file" in str(info.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_convert_sharded_source_with_a_truncated_shard(tmp_path):
    src = write_checkpoint(
        tmp_path / "src", TINY_CHATGLM, make_chatglm_weights(TINY_CHATGLM), "safetensors-sharded"
    )
    shard = src / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:300])
    with pytest.raises(SystemExit) as info:
        _convert(src, tmp_path / "out")
    assert f"{shard}: cannot read this weights file" in str(info.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "config_text, fragments",
    [
        ('{"model_type": "chatglm",', ["config.json:1: not valid JSON"]),
        ("[]", ["config.json: expected a JSON object, got array"]),
        (
            json.dumps({k: v for k, v in TINY_CHATGLM.items() if k != "padded_vocab_size"}),
            ["missing field 'padded_vocab_size'"],
        ),
        (
            json.dumps({**TINY_CHATGLM, "hidden_size": "64"}),
            ["'hidden_size' must be a positive integer", '"64"'],
        ),
    ],
)
def test_convert_bad_source_config_names_file_and_field(chatglm_src, tmp_path, config_text, fragments):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes((chatglm_src / "pytorch_model.bin").read_bytes())
    (src / "config.json").write_text(config_text)
    with pytest.raises(SystemExit) as info:
        _convert(src, tmp_path / "out")
    message = str(info.value)
    assert str(src) in message and all(f in message for f in fragments), message
    assert not (tmp_path / "out").exists()


def test_convert_given_a_file_or_nothing_as_source(chatglm_src, tmp_path):
    with pytest.raises(SystemExit, match="is a file; SRC is the checkpoint directory"):
        _convert(chatglm_src / "pytorch_model.bin", tmp_path / "out")
    with pytest.raises(SystemExit, match="no such directory"):
        _convert(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
