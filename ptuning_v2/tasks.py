"""Answer formats of the bundled tasks, shared by data preparation and evaluation.

NER answers list the entities found, grouped by type, types always in the same order:

    人名：江泽民、李鹏；地名：北京

- types, in this order: 人名 (person, tag ``nr``), 地名 (place, ``ns``), 机构名 (organisation, ``nt``);
- ``类型：`` then the entities joined by ``、`` in order of first appearance, duplicates removed;
- a type with no entity is left out; parts joined by ``；`` (all full-width punctuation);
- the whole answer is ``无`` when the sentence has no entity.

Listing only the types present (rather than ``人名：无`` for each absent one) keeps the answer short and
makes every ``类型：`` promise an entity, so a model cannot score format tokens by answering ``无`` everywhere.

Sentiment answers are exactly ``正面`` or ``负面``.

The embedded backbone's own generic chats (its pretraining mix, ``scripts/pretrain_tiny.py``; the bundled general
chats of ``data/prepare.py``; the retention probes of ``ptuning_v2.retention``) are formats too, so they live here:
continue a text, repeat it (``复述这句话：``), and list the words of 1-3 word classes from POS tags
(``列出这句话里的动词、数词：<sentence>`` → ``动词：…；数词：…``, ``无`` when none is found).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

NER_TYPES: tuple[str, ...] = ("人名", "地名", "机构名")
NER_TAG_TO_TYPE: dict[str, str] = {"nr": "人名", "ns": "地名", "nt": "机构名"}
NO_ENTITY = "无"
# The copy chat of the embedded backbone's pretraining mix (scripts/pretrain_tiny.py); the retention probe
# (ptuning_v2.retention, benchmarks/copy_probe.py) asks it of any backbone.
COPY_INSTRUCTION = "复述这句话："
SENTIMENT_LABELS: tuple[str, ...] = ("负面", "正面")

# Word classes of the PKU tag set that the listing chats ask for. The entity tags (nr person, ns place,
# nt organisation, nz other proper noun, j abbreviation, nx foreign string) are never asked for: they are
# the NER task's answers.
LISTING_CLASSES: dict[str, frozenset[str]] = {
    "名词": frozenset({"n"}),
    "动词": frozenset({"v"}),
    "动名词": frozenset({"vn"}),
    "形容词": frozenset({"a", "ad", "an"}),
    "副词": frozenset({"d"}),
    "数词": frozenset({"m"}),
    "量词": frozenset({"q"}),
    "时间词": frozenset({"t"}),
    "代词": frozenset({"r"}),
    "方位词": frozenset({"f"}),
    "处所词": frozenset({"s"}),
    "介词": frozenset({"p"}),
    "连词": frozenset({"c"}),
    "助词": frozenset({"u"}),
    "成语": frozenset({"i"}),
    "区别词": frozenset({"b"}),
}
LISTING_INSTRUCTION = "列出这句话里的{}："
LISTING_NONE = "无"  # the answer when the sentence has no word of the asked classes


def format_entities(entities: dict[str, list[str]]) -> str:
    """Render ``{type: [entity, ...]}`` in the documented NER answer format."""
    parts = []
    for entity_type in NER_TYPES:
        unique = list(dict.fromkeys(entities.get(entity_type, [])))
        if unique:
            parts.append(f"{entity_type}：{'、'.join(unique)}")
    return "；".join(parts) or LISTING_NONE


def parse_entities(answer: str) -> set[tuple[str, str]]:
    """Parse an NER answer into ``{(type, entity)}``.

    Lenient on purpose: a malformed part (unknown type, no colon) contributes nothing, so a bad
    answer scores as wrong instead of raising. Half-width ``:`` and ``;`` are accepted too.
    """
    found: set[tuple[str, str]] = set()
    normalised = answer.replace(";", "；").replace(":", "：")
    for part in normalised.split("；"):
        entity_type, sep, values = part.strip().partition("：")
        if not sep or entity_type not in NER_TYPES:
            continue
        for entity in values.split("、"):
            entity = entity.strip()
            if entity and entity != NO_ENTITY:
                found.add((entity_type, entity))
    return found


# ---------------------------------------------------------------- the backbone's generic chats


def continuation_chat(text: str, rng: random.Random) -> tuple[str, str]:
    """A text cut in two at a random 30-70% of its characters: the user turn is the start, the reply the rest."""
    cut = rng.randint(math.ceil(0.3 * len(text)), math.floor(0.7 * len(text)))
    return text[:cut], text[cut:]


def listing_prompt(words: list[str], classes: list[str]) -> str:
    """``列出这句话里的<class>、<class>：<sentence>``."""
    return LISTING_INSTRUCTION.format("、".join(classes)) + "".join(words)


def listing_answer(words: list[str], tags: list[str], classes: list[str]) -> str:
    """The words of each asked class found in the sentence, in order and without repeats
    (``类：词、词；类：词``), or ``无`` when none is found."""
    parts = []
    for name in classes:
        found = [w for w, t in zip(words, tags) if t in LISTING_CLASSES[name]]
        if found:
            parts.append(f"{name}：{'、'.join(dict.fromkeys(found))}")
    return "；".join(parts) or LISTING_NONE


def listing_chat(words: list[str], tags: list[str], rng: random.Random) -> tuple[str, str]:
    """A generic extraction chat over one tagged sentence: ask for 1-3 word classes, answer with the
    words of each class found (``listing_answer``). It teaches the backbone to read an instruction and copy
    spans of its input; the classes never include an entity tag."""
    classes = rng.sample(sorted(LISTING_CLASSES), rng.randint(1, 3))
    return listing_prompt(words, classes), listing_answer(words, tags, classes)


def parse_listing(answer: str) -> set[tuple[str, str]]:
    """A listing answer as ``{(class, word)}``; lenient like ``parse_entities`` (a malformed part counts nothing)."""
    found: set[tuple[str, str]] = set()
    for part in answer.replace(";", "；").replace(":", "：").split("；"):
        name, sep, values = part.strip().partition("：")
        if sep and name in LISTING_CLASSES:
            found.update((name, word.strip()) for word in values.split("、") if word.strip())
    return found


def read_tagged(path: str | Path) -> list[tuple[list[str], list[str]]]:
    """A POS-tagged sentence file (``data/pretrain/*_tagged.json``: ``{"words": [...], "tags": [...]}`` a line)
    as ``(words, tags)`` pairs; a bad line is named by file and line."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: malformed JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), list) for k in ("words", "tags")):
            raise ValueError(f'{path}:{n}: expected {{"words": [...], "tags": [...]}}')
        if len(row["words"]) != len(row["tags"]):
            raise ValueError(f"{path}:{n}: {len(row['words'])} words but {len(row['tags'])} tags")
        rows.append((row["words"], row["tags"]))
    return rows
