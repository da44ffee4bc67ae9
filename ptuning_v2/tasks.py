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
"""

from __future__ import annotations

NER_TYPES: tuple[str, ...] = ("人名", "地名", "机构名")
NER_TAG_TO_TYPE: dict[str, str] = {"nr": "人名", "ns": "地名", "nt": "机构名"}
NO_ENTITY = "无"
# The copy chat of the embedded backbone's pretraining mix (scripts/pretrain_tiny.py); benchmarks/copy_probe.py
# asks it of any backbone.
COPY_INSTRUCTION = "复述这句话："
SENTIMENT_LABELS: tuple[str, ...] = ("负面", "正面")


def format_entities(entities: dict[str, list[str]]) -> str:
    """Render ``{type: [entity, ...]}`` in the documented NER answer format."""
    parts = []
    for entity_type in NER_TYPES:
        unique = list(dict.fromkeys(entities.get(entity_type, [])))
        if unique:
            parts.append(f"{entity_type}：{'、'.join(unique)}")
    return "；".join(parts) or NO_ENTITY


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
