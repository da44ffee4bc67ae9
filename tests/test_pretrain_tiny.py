"""Document building of scripts/pretrain_tiny.py (the training loop itself runs in the model card's run)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
from tiny_models import char_tokenizer

from ptuning_v2.tasks import LISTING_CLASSES, NER_TAG_TO_TYPE, NER_TYPES

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pretrain_tiny", REPO / "scripts" / "pretrain_tiny.py")
pretrain = importlib.util.module_from_spec(_spec)
sys.modules["pretrain_tiny"] = pretrain
_spec.loader.exec_module(pretrain)

WORDS = ["江", "泽民", "在", "北京", "会见", "了", "新华社", "记者", "。"]
TAGS = ["nr", "nr", "p", "ns", "v", "u", "nt", "n", "w"]


def test_listing_chat_never_asks_for_entities() -> None:
    entity_tags = set(NER_TAG_TO_TYPE) | {"nz", "j", "nx"}
    for tags in LISTING_CLASSES.values():
        assert not tags & entity_tags
    rng = random.Random(0)
    for _ in range(200):
        user, reply = pretrain.listing_chat(WORDS, TAGS, rng)
        assert user.endswith("".join(WORDS))
        for entity_type in NER_TYPES:
            assert entity_type not in user and entity_type not in reply
        for name in ("江", "泽民", "北京", "新华社"):
            assert name not in reply


def test_listing_chat_answers_from_the_tags() -> None:
    rng = random.Random(3)
    seen = set()
    for _ in range(300):
        user, reply = pretrain.listing_chat(WORDS, TAGS, rng)
        asked = user.removeprefix("列出这句话里的").split("：")[0].split("、")
        expected = {}
        for name in asked:
            words = [w for w, t in zip(WORDS, TAGS) if t in LISTING_CLASSES[name]]
            if words:
                expected[name] = "、".join(words)
        if not expected:
            assert reply == "无"
            continue
        assert dict(part.split("：") for part in reply.split("；")) == expected
        assert [part.split("：")[0] for part in reply.split("；")] == [n for n in asked if n in expected]
        seen.update(asked)
    assert {"名词", "动词", "介词", "助词"} <= seen


def test_copy_chats_repeat_the_text() -> None:
    lines = ["他们到闹市区去狂欢，在市中心数新年钟声的敲响。", "这本书的内容很丰富，推荐购买！"] * 20
    tokenizer = char_tokenizer(lines + [pretrain.COPY_INSTRUCTION])
    docs, n_chat, n_copy = pretrain.build_documents(lines, tokenizer, 1.0, seed=0, copy_fraction=0.5)
    assert n_chat == len(lines) and 0 < n_copy < n_chat
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    copies = 0
    for doc in docs:
        user = tokenizer.decode(doc[: doc.index(assistant)], skip_special_tokens=True).strip()
        reply = tokenizer.decode(doc[doc.index(assistant) + 1 :], skip_special_tokens=True).strip()
        if user.startswith(pretrain.COPY_INSTRUCTION):
            assert user == pretrain.COPY_INSTRUCTION + reply
            copies += 1
        else:
            assert user + reply in lines  # a continuation chat: the text cut in two
    assert copies == n_copy


def test_read_tagged_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "train_tagged.json"
    good = json.dumps({"words": ["a", "b"], "tags": ["n", "v"]})
    path.write_text(good + "\n" + json.dumps({"words": ["a"], "tags": ["n", "v"]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_tagged.json:2: 1 words but 2 tags"):
        pretrain.read_tagged(path)


def test_pack_keeps_documents_whole() -> None:
    rng = random.Random(0)
    docs = [[rng.randint(1, 99) for _ in range(rng.randint(1, 30))] for _ in range(200)]
    docs.append(list(range(1, 71)))  # longer than a row: the only kind that is split
    rows = pretrain.pack(docs, seq_len=32, pad_id=0).tolist()
    assert all(len(row) == 32 for row in rows)
    real = [[t for t in row if t != 0] for row in rows]
    assert all(row[len(r) :] == [0] * (32 - len(r)) for row, r in zip(rows, real))  # padding only at the end
    assert sorted(t for r in real for t in r) == sorted(t for d in docs for t in d)  # nothing lost
    streams = ["," + ",".join(map(str, r)) + "," for r in real]
    for doc in docs[:-1]:  # each short document lies whole in one row
        assert any("," + ",".join(map(str, doc)) + "," in s for s in streams)
