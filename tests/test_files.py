"""ptuning_v2.files (atomic writers, JSON objects) and the weight-file reader of ptuning_v2.chatglm."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ptuning_v2.chatglm import ChatGLMConversionError
from ptuning_v2.files import (
    atomic_directory,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    intended_path,
    read_json_object,
    swap_directory,
)
from ptuning_v2.weights import WeightFileError, find_weight_files, read_weight_file, read_weight_keys


def _leftovers(directory: Path) -> list[str]:
    """Temporary or set-aside entries anywhere under ``directory``."""
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if ".tmp" in p.name or ".old-" in p.name
    )


def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


class Boom(Exception):
    pass


# ------------------------------------------------------------------------------ atomic_directory(replace=True)


def test_replace_swaps_the_whole_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "x").write_text("old x")
    with atomic_directory(target, replace=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-") and list(tmp.iterdir()) == []
        assert _tree(target) == {"old.bin": "old", "sub/x": "old x"}  # nothing visible before the end
        (tmp / "config.json").write_text("{}")
        (tmp / "weights.bin").write_text("new")
    assert _tree(target) == {"config.json": "{}", "weights.bin": "new"}
    assert _leftovers(tmp_path) == []


def test_replace_creates_a_new_target_and_its_parents(tmp_path):
    target = tmp_path / "a" / "b" / "model"
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "f").write_text("1")
    assert _tree(target) == {"f": "1"} and _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_replace_error_mid_write_leaves_the_target_untouched(tmp_path, error):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.bin").write_text("old")
    with pytest.raises(error):
        with atomic_directory(target, replace=True) as tmp:
            (tmp / "half.bin").write_text("half")
            raise error()
    assert _tree(target) == {"keep.bin": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_error_removes_only_the_parents_it_created(tmp_path):
    (tmp_path / "existing").mkdir()
    target = tmp_path / "existing" / "new" / "deeper" / "model"
    for replace in (True, False):
        with pytest.raises(Boom):
            with atomic_directory(target, replace=replace) as tmp:
                (tmp / "f").write_text("x")
                raise Boom
        assert (tmp_path / "existing").is_dir() and list((tmp_path / "existing").iterdir()) == []


def test_directory_modes_follow_the_umask_like_mkdir(tmp_path):
    (tmp_path / "plain").mkdir()
    with atomic_directory(tmp_path / "model", replace=True) as tmp:
        (tmp / "f").write_text("x")
    mode = (tmp_path / "model").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 and mode != 0o700


# ----------------------------------------------------------------------------- atomic_directory(replace=False)


def test_file_by_file_keeps_other_files_and_puts_last_last(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-10"
    target.mkdir()
    (target / "optimizer.pt").write_text("opt")
    (target / "prefix_config.json").write_text("old config")
    moved: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    with atomic_directory(target, replace=False, last=("prefix_config.json",)) as tmp:
        # written config first, on purpose: the order of the moves is not the order of writing
        (tmp / "prefix_config.json").write_text("new config")
        (tmp / "zzz_weights.safetensors").write_text("new weights")
        (tmp / "aaa_extra.json").write_text("extra")
    assert moved == ["aaa_extra.json", "zzz_weights.safetensors", "prefix_config.json"]
    assert _tree(target) == {
        "aaa_extra.json": "extra",
        "optimizer.pt": "opt",
        "prefix_config.json": "new config",
        "zzz_weights.safetensors": "new weights",
    }
    assert _leftovers(tmp_path) == []


def test_file_by_file_several_last_names_keep_their_order(tmp_path, monkeypatch):
    moved: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (moved.append(Path(d).name), real_replace(s, d))[1])
    with atomic_directory(tmp_path / "out", replace=False, last=("b.json", "a.json", "absent.json")) as tmp:
        for name in ("a.json", "b.json", "c.bin"):
            (tmp / name).write_text(name)
    assert moved == ["c.bin", "b.json", "a.json"]


def test_crash_between_moves_leaves_no_config_without_its_weights(tmp_path, monkeypatch):
    """A reader that finds the new config finds the new weights: the weights are in place before the config."""
    target = tmp_path / "ckpt"
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "prefix_config.json":
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target, replace=False, last=("prefix_config.json",)) as tmp:
            (tmp / "prefix_config.json").write_text("config")
            (tmp / "prefix_model.safetensors").write_text("weights")
    assert _tree(target) == {"prefix_model.safetensors": "weights"}
    assert _leftovers(tmp_path) == []


def test_file_by_file_error_mid_write_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "prefix_model.safetensors").write_text("old weights")
    (target / "prefix_config.json").write_text("old config")
    with pytest.raises(Boom):
        with atomic_directory(target, replace=False, last=("prefix_config.json",)) as tmp:
            (tmp / "prefix_model.safetensors").write_text("new weights")
            raise Boom
    assert _tree(target) == {"prefix_config.json": "old config", "prefix_model.safetensors": "old weights"}
    assert _leftovers(tmp_path) == []
    with pytest.raises(Boom):
        with atomic_directory(tmp_path / "never", replace=False) as tmp:
            raise Boom
    assert not (tmp_path / "never").exists()


def test_file_by_file_replaces_a_subdirectory_whole(tmp_path):
    target = tmp_path / "out"
    (target / "tokenizer").mkdir(parents=True)
    (target / "tokenizer" / "stale.txt").write_text("stale")
    with atomic_directory(target, replace=False) as tmp:
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "vocab.txt").write_text("new")
    assert _tree(target) == {"tokenizer/vocab.txt": "new"} and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- swap_directory


def test_swap_directory(tmp_path):
    staging = tmp_path / ".staging" / "checkpoint-5"
    staging.mkdir(parents=True)
    (staging / "f").write_text("new")
    final = tmp_path / "checkpoint-5"
    assert swap_directory(staging, final) == final and _tree(final) == {"f": "new"}
    again = tmp_path / "again"
    again.mkdir()
    (again / "g").write_text("newer")
    swap_directory(again, final)
    assert _tree(final) == {"g": "newer"} and not again.exists() and _leftovers(tmp_path) == []


def test_swap_directory_puts_the_old_tree_back_when_the_new_one_cannot_go_in(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "f").write_text("old")
    with pytest.raises(OSError):
        swap_directory(tmp_path / "does-not-exist", final)
    assert _tree(final) == {"f": "old"} and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- single files


def test_atomic_write_text_and_bytes(tmp_path):
    path = tmp_path / "deep" / "generated_predictions.txt"
    assert atomic_write_text(path, "甲\n") == path and path.read_text(encoding="utf-8") == "甲\n"
    atomic_write_text(path, "乙\n")
    assert path.read_text(encoding="utf-8") == "乙\n"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    (tmp_path / "plain").write_text("x")
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # umask, not 0o600
    assert _leftovers(tmp_path) == []


def test_atomic_open_error_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "predictions.txt"
    path.write_text("old\n")
    with pytest.raises(Boom):
        with atomic_open(path) as f:
            f.write("half")
            raise Boom
    assert path.read_text() == "old\n" and _leftovers(tmp_path) == []
    with pytest.raises(Boom):
        with atomic_open(tmp_path / "new" / "file.txt") as f:
            raise Boom
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(path, "a"):
            pass


# ------------------------------------------------------------------------------------------- JSON objects


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'{"a": ', "config.json:1: not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got array"),
        (b"\xff\xfe{", "not UTF-8 text (byte 0)"),
    ],
)
def test_read_json_object_names_the_file(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ChatGLMConversionError) as info:
        read_json_object(path, ChatGLMConversionError)
    assert str(path) in str(info.value) and fragment in str(info.value)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')  # a BOM is fine
    assert read_json_object(path) == {"a": 1}


# ---------------------------------------------------------------------------------------- weight files

PREFIX = "transformer.prefix_encoder."


def _save(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    if file.suffix == ".safetensors":
        save_file(tensors, file)
    else:
        torch.save(tensors, file)


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "transformer.embedding.word_embeddings.weight": torch.ones(3, 2),
        PREFIX + "embedding.weight": torch.arange(6.0).reshape(2, 3),
        "transformer.output_layer.weight": torch.zeros(3, 2),
    }


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_read_weight_file_selects_by_name(tmp_path, fmt):
    file = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    _save(file, _tensors())
    assert sorted(read_weight_keys(file)) == sorted(_tensors())
    assert sorted(read_weight_file(file)) == sorted(_tensors())
    got = read_weight_file(file, lambda k: k.startswith(PREFIX))
    assert list(got) == [PREFIX + "embedding.weight"] and torch.equal(
        got[PREFIX + "embedding.weight"], _tensors()[PREFIX + "embedding.weight"]
    )
    assert find_weight_files(tmp_path) == [file]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_read_weight_file_names_a_truncated_file(tmp_path, fmt):
    class CustomError(ValueError):
        pass

    file = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    _save(file, _tensors())
    file.write_bytes(file.read_bytes()[:100])
    for read in (read_weight_keys, read_weight_file):
        with pytest.raises(CustomError) as info:
            read(file, error=CustomError)
        assert f"{file}: cannot read this weights file" in str(info.value)
        assert "truncated or corrupt" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        read_weight_file(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_an_error_in_select_is_not_blamed_on_the_file(tmp_path, fmt):
    file = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    _save(file, _tensors())

    def select(name: str) -> bool:
        raise Boom(name)

    with pytest.raises(Boom):
        read_weight_file(file, select)


def test_read_weight_file_refuses_what_is_not_a_state_dict_of_tensors(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save([torch.ones(1)], file)
    with pytest.raises(WeightFileError, match="holds a list, not a state dict"):
        read_weight_file(file)
    torch.save({PREFIX + "embedding.weight": 3, "other": "fine, not selected"}, file)
    with pytest.raises(WeightFileError, match=r"'transformer.prefix_encoder.embedding.weight' is a int"):
        read_weight_file(file, lambda k: k.startswith(PREFIX))


def test_find_weight_files_with_an_index(tmp_path):
    tensors = _tensors()
    names = list(tensors)
    save_file({names[0]: tensors[names[0]]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[1:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {names[0]: "model-00001-of-00002.safetensors"}
    weight_map.update(dict.fromkeys(names[1:], "model-00002-of-00002.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    shards = [tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"]
    assert find_weight_files(tmp_path) == shards
    assert find_weight_files(tmp_path, lambda k: k.startswith(PREFIX)) == shards[1:]
    assert find_weight_files(tmp_path, lambda k: False) == []
    shards[0].unlink()
    with pytest.raises(WeightFileError) as info:
        find_weight_files(tmp_path)
    assert str(index) in str(info.value) and "model-00001-of-00002.safetensors" in str(info.value)
    index.write_text(json.dumps({"weight_map": ["not", "an", "object"]}))
    with pytest.raises(WeightFileError, match="'weight_map' must be an object"):
        find_weight_files(tmp_path)


def test_find_weight_files_without_weights(tmp_path):
    assert find_weight_files(tmp_path, required=False) == []
    with pytest.raises(WeightFileError, match="no weights found"):
        find_weight_files(tmp_path)


def test_a_failed_write_names_the_file_it_was_for(tmp_path, monkeypatch):
    """A full disk's write() error names no file; atomic_open gives it the file's name, not the temporary one."""
    assert (
        intended_path(tmp_path / ".ckpt.tmp-1a2b3c4d" / ".x.json.tmp-5e6f7a8b")
        == tmp_path / "ckpt" / "x.json"
    )
    assert intended_path(tmp_path / ".hidden" / "x.json") == tmp_path / ".hidden" / "x.json"
    with pytest.raises(OSError) as err, atomic_open(tmp_path / "out.txt") as f:
        f.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert err.value.filename == str(tmp_path / "out.txt") and _leftovers(tmp_path) == []
