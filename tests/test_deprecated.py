"""Names the methods reshaping removed still work for a release: the same result as their successor, and a
FutureWarning that names the successor and points at the caller's line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import random_ids, tiny_model

import ptuning_v2
from ptuning_v2 import PrefixConfig, attach_prefix, load_model


def prefixed(seed: int = 0):
    model = attach_prefix(tiny_model(seed=seed), PrefixConfig(pre_seq_len=4, prefix_projection=True))
    torch.nn.init.normal_(model.tuning.encoder.embedding.weight)  # a prefix that moves the logits
    return model.eval()


def same_checkpoint(a, b) -> bool:
    tensors_a, tensors_b = (
        load_file(a / "prefix_model.safetensors"),
        load_file(b / "prefix_model.safetensors"),
    )
    same_tensors = tensors_a.keys() == tensors_b.keys() and all(
        torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a
    )
    # base_model records where the backbone came from (a path once loaded, none when built in the test)
    configs = [json.loads((d / "prefix_config.json").read_text()) for d in (a, b)]
    configs = [{k: v for k, v in c.items() if k != "base_model"} for c in configs]
    return same_tensors and configs[0] == configs[1]


def test_save_prefix_saves_what_tuning_save_saves_and_names_it(tmp_path):
    model = prefixed()
    with pytest.warns(
        FutureWarning, match=r"model\.save_prefix\(dir\) is deprecated.*use model\.tuning\.save\(dir\)"
    ) as caught:
        written = model.save_prefix(tmp_path / "old")
    assert caught[0].filename == __file__  # the warning points at the caller
    assert written == tmp_path / "old"
    model.tuning.save(tmp_path / "new")
    assert same_checkpoint(tmp_path / "old", tmp_path / "new")


def test_a_loaded_prefix_keeps_save_prefix(tmp_path):
    tiny_model().save_pretrained(tmp_path / "backbone")
    prefixed().tuning.save(tmp_path / "prefix")
    loaded = load_model(str(tmp_path / "backbone"), ptuning_checkpoint=str(tmp_path / "prefix"))
    with pytest.warns(FutureWarning, match=r"model\.tuning\.save\(dir\)"):
        loaded.save_prefix(tmp_path / "again")
    assert same_checkpoint(tmp_path / "prefix", tmp_path / "again")


def test_save_prefix_checkpoint_is_tuning_save(tmp_path):
    model = prefixed()
    with pytest.warns(
        FutureWarning, match=r"save_prefix_checkpoint\(model, dir\) is deprecated.*model\.tuning\.save\(dir\)"
    ):
        ptuning_v2.save_prefix_checkpoint(model, tmp_path / "old")
    model.tuning.save(tmp_path / "new")
    assert same_checkpoint(tmp_path / "old", tmp_path / "new")


def test_prefix_disabled_runs_the_bare_backbone_as_tuning_bare_does():
    model = prefixed()
    ids = random_ids(2, 6)
    with torch.no_grad():
        with_prefix = model(input_ids=ids).logits
        with model.tuning.bare():
            bare = model(input_ids=ids).logits
        with pytest.warns(
            FutureWarning, match=r"prefix_disabled\(model\) is deprecated.*use model\.tuning\.bare\(\)"
        ) as caught:
            context = ptuning_v2.prefix_disabled(model)
        with context as inside:
            assert inside is model
            disabled = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert caught[0].filename == __file__
    assert not torch.allclose(with_prefix, bare)  # the prefix matters, so the comparison below says something
    assert torch.equal(disabled, bare) and torch.equal(after, with_prefix)


def test_the_aliases_stay_out_of_the_package_listing():
    assert "prefix_disabled" not in ptuning_v2.__all__ and "save_prefix_checkpoint" not in dir(ptuning_v2)
    with pytest.raises(AttributeError, match="no attribute 'save_prefix_checkpoints'"):
        ptuning_v2.save_prefix_checkpoints  # noqa: B018
