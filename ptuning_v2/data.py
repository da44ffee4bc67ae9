"""Data → tokens for P-Tuning v2 training: load conversations, tokenize, pad.

Every example is normalised to ``{"messages": [{"role": ..., "content": ...}, ...]}``; roles are
``system``, ``user``, ``assistant``, ``observation`` and ``tool``, and a conversation ends with the
assistant turn that is its final response.

Prompts come from the tokenizer's chat template when it has one. Without one, the documented plain
format is the ChatGLM2 ``build_prompt``::

    [Round 1]\\n\\n问：{query 1}\\n\\n答：{response 1}\\n\\n[Round 2]\\n\\n问：{query 2}\\n\\n答：{response 2}

i.e. each earlier round is ``"[Round {i}]\\n\\n问：{query}\\n\\n答：{response}\\n\\n"`` (1-based), the
last one ``"[Round {n}]\\n\\n问：{query}\\n\\n答："`` followed by the response. The plain format only
knows alternating user/assistant turns.

Loss falls on every assistant turn and on the eos after the final response; every other token is
labelled ``-100``. Truncation follows the official recipe: the prompt (everything before the final
response) keeps its last ``max_source_length`` tokens, the final response its first
``max_target_length``, then eos is appended (at most ``max_source_length + max_target_length + 1``).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "observation", "tool")
MESSAGES_FEATURES = datasets.Features(
    {"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})}
)
_TRAIN_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "prompt_truncated": datasets.Value("bool"),
        "response_truncated": datasets.Value("bool"),
        "empty_response": datasets.Value("bool"),
    }
)
_GENERATION_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "attention_mask": datasets.List(datasets.Value("int8")),
        "label_text": datasets.Value("string"),
    }
)
_FLAG_COLUMNS = ["prompt_truncated", "response_truncated", "empty_response"]
_WHITESPACE = re.compile(r"\s*")
_LOG = logging.getLogger(__name__)


@dataclass
class DataConfig:
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: str | None = None
    max_source_length: int = 64
    max_target_length: int = 128
    source_prefix: str = ""


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    dropped_empty: int = 0

    @property
    def kept(self) -> int:
        return self.examples - self.dropped_empty

    def summary(self) -> str:
        return (
            f"tokenized {self.examples} examples: kept {self.kept}, dropped {self.dropped_empty} with an "
            f"empty response; truncated {self.truncated_prompts} prompts (max_source_length) and "
            f"{self.truncated_responses} responses (max_target_length)"
        )


# --------------------------------------------------------------------------------------------- loading


def load_conversations(
    path: str | os.PathLike, config: DataConfig, cache_dir: str | None = None
) -> datasets.Dataset:
    """Read a JSON-lines file (or a ``.json`` file holding a list) into a ``messages`` dataset.

    The whole file is validated here, before ``datasets`` sees it, so that every error names the
    exact ``file:line``. The format (AdvertiseGen columns, ChatGLM3 ``conversations``, GLM-4
    ``messages``) is detected from the first record and then required of every record.
    """
    path = os.path.abspath(os.fspath(path))
    raw, records, kind, _ = _read(path, config)
    # Keyed on content, config and this module's code, so an edited file or a code change never
    # reuses a stale cache (the path alone would).
    fingerprint = _hash(raw, json.dumps(asdict(config), sort_keys=True).encode(), _module_digest().encode())
    dataset = datasets.Dataset.from_generator(
        _yield_records,
        features=MESSAGES_FEATURES,
        cache_dir=cache_dir,
        gen_kwargs={"records": records},  # a tuple: datasets would shard a list into one job per item
        fingerprint=fingerprint,
    )
    # Where the rows came from, for later errors (select/map/filter keep a dataset's info).
    response = (
        f"the response column {config.response_column!r} (response_column)"
        if kind == "columns"
        else f"the final assistant turn of each {kind!r} list"
    )
    dataset.info.description = _SOURCE_TAG + json.dumps({"file": path, "response": response})
    return dataset


def read_conversations(
    path: str | os.PathLike, config: DataConfig
) -> tuple[list[tuple[str, list[dict]]], str]:
    """Every record of a data file as ``(file:line, messages)`` and the file's format (``"columns"``,
    ``"conversations"`` or ``"messages"``), validated as ``load_conversations`` does, without building a dataset:
    what the settings checks read (the texts a mix file holds, and where)."""
    _, records, kind, locations = _read(os.path.abspath(os.fspath(path)), config)
    return [(where, record["messages"]) for where, record in zip(locations, records)], kind


def conversation_format(path: str | os.PathLike) -> str | None:
    """The format of a data file as its first record shows it (``"columns"``, ``"conversations"`` or
    ``"messages"``; every record must have it), or None for a file without a first record to tell."""
    path = os.path.abspath(os.fspath(path))
    text = decode_utf8(path, Path(path).read_bytes())
    parse = iter_json_array if text.lstrip().startswith("[") else iter_json_lines
    for _, obj in parse(path, text):
        return _format_of(obj) if isinstance(obj, dict) else None
    return None


def _format_of(obj: dict) -> str:
    return "messages" if "messages" in obj else "conversations" if "conversations" in obj else "columns"


def _read(path: str, config: DataConfig) -> tuple[bytes, tuple[dict, ...], str, list[str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    raw = Path(path).read_bytes()
    records, kind, locations = _normalised_records(path, decode_utf8(path, raw), config)
    if not records:
        raise ValueError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return raw, records, kind, locations


_SOURCE_TAG = "ptuning_v2.data source: "


def _source(dataset: datasets.Dataset) -> dict[str, str]:
    """The file and response field ``load_conversations`` recorded for ``dataset`` ({} when unknown)."""
    description = getattr(dataset.info, "description", None) or ""
    if not description.startswith(_SOURCE_TAG):
        return {}
    try:
        return json.loads(description[len(_SOURCE_TAG) :])
    except json.JSONDecodeError:
        return {}


def decode_utf8(path: str, raw: bytes) -> str:
    """The file's text; a file that is not UTF-8 is reported with its line and column, and a likely encoding."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(
            f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8, e.g. "
            f"iconv -f UTF-16 -t UTF-8 {path} > fixed.jsonl"
        )
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        line = raw.count(b"\n", 0, offset) + 1
        line_start = max(raw.rfind(b"\n", 0, offset) + 1, bom)
        # Everything before the first bad byte is valid UTF-8, so the column counts characters.
        column = len(raw[line_start:offset].decode("utf-8")) + 1
        hint = ""
        for encoding in ("gb18030", "big5"):
            try:
                raw[bom:].decode(encoding)
            except UnicodeDecodeError:
                continue
            hint = (
                f"; it decodes as {encoding.upper()}, so it was probably saved in that encoding: convert it with "
                f"iconv -f {encoding.upper()} -t UTF-8 {path} > fixed.jsonl"
            )
            break
        raise ValueError(
            f"{path}:{line}: not UTF-8 text: invalid byte 0x{raw[offset]:02x} at line {line}, column {column} "
            f"(byte offset {offset}){hint or '; save the file as UTF-8'}"
        ) from err


def _yield_records(records: tuple[dict, ...]) -> Iterator[dict]:
    yield from records


def _hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:32]


@cache
def _module_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _normalised_records(
    path: str, text: str, config: DataConfig
) -> tuple[tuple[dict, ...], str | None, list[str]]:
    """Every record as ``{"messages": [...]}``, the format detected from the first one, and each record's
    ``file:line``."""
    # A file that starts with "[" is one JSON list of rows, whatever its extension says.
    parse = iter_json_array if text.lstrip().startswith("[") else iter_json_lines
    kind = None
    records, locations = [], []
    for location, obj in parse(path, text):
        if not isinstance(obj, dict):
            raise ValueError(
                f"{location}: expected a JSON object (one row), got {type(obj).__name__}: "
                f"{json.dumps(obj, ensure_ascii=False)[:80]}"
            )
        if kind is None:
            kind = _format_of(obj)
        if kind == "columns":
            messages = _columns_to_messages(obj, location, config)
        else:
            messages = _turns_to_messages(_require(obj, kind, location), location, kind)
        _check_conversation(messages, location)
        records.append({"messages": _with_prefix(messages, config.source_prefix)})
        locations.append(location)
    return tuple(records), kind, locations


def iter_json_lines(path: str, text: str) -> Iterator[tuple[str, Any]]:
    # split("\n"), not splitlines(): U+2028 and friends may legally sit unescaped inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            _check_multiline_object(path, text, lineno)
            raise ValueError(f"{path}:{lineno}: malformed JSON: {err.msg} (column {err.colno})") from err
        yield f"{path}:{lineno}", obj


def _check_multiline_object(path: str, text: str, lineno: int) -> None:
    """Explain a file that is one pretty-printed JSON object rather than JSON lines."""
    if lineno != 1 and text[: text.find("\n")].strip():
        return
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return
    if not isinstance(whole, dict):
        return
    lists = [
        key
        for key, value in whole.items()
        if isinstance(value, list) and value and isinstance(value[0], dict)
    ]
    hint = (
        f"; its field {lists[0]!r} holds a list of {len(whole[lists[0]])} objects: save that list alone"
        if lists
        else ""
    )
    raise ValueError(
        f"{path}:1: the file is a single JSON object spread over {text.count(chr(10)) + 1} lines; expected JSON "
        f"lines (one object per line) or a JSON list of objects{hint}"
    )


def iter_json_array(path: str, text: str) -> Iterator[tuple[str, Any]]:
    """Items of a top-level JSON list, each with the line it starts on (json.loads would lose it)."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted_to = 1, 0
    closed = text.startswith("]", pos)
    while not closed:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from err
        line, counted_to = line + text.count("\n", counted_to, pos), pos
        yield f"{path}:{line}", obj
        pos = _WHITESPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            closed = True
        else:
            lineno = text.count("\n", 0, pos) + 1
            raise ValueError(f"{path}:{lineno}: malformed JSON: expected ',' or ']' after a list item")
    if text[pos + 1 :].strip():
        lineno = text.count("\n", 0, pos) + 1
        raise ValueError(f"{path}:{lineno}: malformed JSON: extra data after the top-level list")


def _require(obj: dict, column: str, location: str, setting: str | None = None) -> Any:
    if column not in obj:
        named_by = f" (named by the {setting} setting)" if setting else ""
        raise ValueError(f"{location}: missing column {column!r}{named_by}; available columns: {list(obj)}")
    return obj[column]


def _require_str(value: Any, field: str, location: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{location}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _columns_to_messages(obj: dict, location: str, config: DataConfig) -> list[dict]:
    prompt = _require(obj, config.prompt_column, location, "prompt_column")
    query = _require_str(prompt, config.prompt_column, location)
    response = _require(obj, config.response_column, location, "response_column")
    answer = _require_str(response, config.response_column, location)
    messages = []
    if config.history_column is not None:
        history = _require(obj, config.history_column, location, "history_column")
        for old_query, old_answer in _history_pairs(history, config.history_column, location):
            messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": old_answer}]
    return messages + [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]


def _history_pairs(history: Any, field: str, location: str) -> list[tuple[str, str]]:
    if history is None:  # null history = a first round, as in the official recipe
        return []
    problem = f"{location}: field {field!r} must be a list of [query, answer] pairs of strings"
    if not isinstance(history, list):
        raise ValueError(f"{problem}, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ValueError(f"{problem}; item {i} is {json.dumps(pair, ensure_ascii=False)[:80]}")
    return [tuple(pair) for pair in history]


def _turns_to_messages(turns: Any, location: str, field: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{location}: field {field!r} must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{location}: field {where!r} must be an object, got {type(turn).__name__}")
        role = _require_str(turn.get("role"), f"{where}.role", location)
        if role not in ROLES:
            raise ValueError(
                f"{location}: field {where + '.role'!r} is {role!r}; expected one of {list(ROLES)}"
            )
        # Only role and content are kept: tool schemas / call metadata have no slot in the templates used here.
        content = _require_str(turn.get("content"), f"{where}.content", location)
        messages.append({"role": role, "content": content})
    return messages


def _check_conversation(messages: list[dict], location: str) -> None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError(f"{location}: field 'messages' has no assistant turn (nothing to learn from)")
    if roles[0] == "assistant":
        raise ValueError(
            f"{location}: field 'messages' starts with an assistant turn; a prompt must come first"
        )
    if roles[-1] != "assistant":
        raise ValueError(
            f"{location}: field 'messages' ends with a {roles[-1]!r} turn; the last turn must be the "
            "assistant's final response"
        )


def _with_prefix(messages: list[dict], prefix: str) -> list[dict]:
    """Prepend ``source_prefix`` to the last user turn: the instruction belongs to the query being answered."""
    if not prefix:
        return messages
    for message in reversed(messages):
        if message["role"] == "user":
            message["content"] = prefix + message["content"]
            break
    return messages


# ------------------------------------------------------------------------------------------ tokenizing


def tokenize_for_training(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> tuple[datasets.Dataset, TokenizeStats]:
    """``input_ids`` and ``labels`` (``-100`` off the assistant turns); empty responses are dropped."""
    _check_inputs(dataset, config)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; training needs one to end the response")
    mapped = dataset.map(
        _tokenize_training_example,
        fn_kwargs=_tokenize_kwargs(tokenizer, config),
        remove_columns=dataset.column_names,
        features=_TRAIN_FEATURES,
        desc="tokenizing for training",
    )
    stats = TokenizeStats(
        examples=len(mapped),
        truncated_prompts=sum(mapped["prompt_truncated"]),
        truncated_responses=sum(mapped["response_truncated"]),
        dropped_empty=sum(mapped["empty_response"]),
    )
    if stats.kept == 0:
        source = _source(dataset)
        where = f"{source['file']}: " if source.get("file") else ""
        field = source.get("response") or "the final assistant turn"
        raise ValueError(
            f"{where}every example was dropped for an empty response: {field} is empty or blank in all "
            f"{stats.examples} examples; is that the field holding the answers? ({stats.summary()})"
        )
    kept = mapped.filter(_is_kept, input_columns="empty_response", desc="dropping empty responses")
    return kept.remove_columns(_FLAG_COLUMNS), stats


def tokenize_for_generation(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> datasets.Dataset:
    """The prompt up to the final response (same tokens as in training) plus its reference ``label_text``.

    Unpadded; empty references are kept, since evaluation should see every example.
    """
    _check_inputs(dataset, config)
    mapped = dataset.map(
        _tokenize_generation_example,
        fn_kwargs=_tokenize_kwargs(tokenizer, config),
        remove_columns=dataset.column_names,
        features=_GENERATION_FEATURES,
        desc="tokenizing for generation",
    )
    if len(mapped) and not any(text.strip() for text in mapped["label_text"]):
        source = _source(dataset)
        _LOG.warning(
            "%severy reference is empty: %s is empty or blank in all %d examples, so reference-based "
            "metrics will all be 0",
            f"{source['file']}: " if source.get("file") else "",
            source.get("response") or "the final assistant turn",
            len(mapped),
        )
    return mapped


def generation_prompt_ids(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_source_length: int = 1024
) -> list[int]:
    """The prompt for the next assistant turn of ``messages``, tokenized exactly as training does it."""
    protected_ids = _tokenize_kwargs(tokenizer, DataConfig(max_source_length=max_source_length))[
        "protected_ids"
    ]
    conversation = [*messages, {"role": "assistant", "content": ""}]
    return _prompt_ids(conversation, tokenizer, max_source_length, protected_ids)


def training_collator(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict]:
    """Pad each batch to its longest example: ``pad_token_id`` for inputs, ``-100`` for labels."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad_token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)


def _check_inputs(dataset: datasets.Dataset, config: DataConfig) -> None:
    if "messages" not in dataset.column_names:
        raise ValueError(f"expected a 'messages' column (see load_conversations), got {dataset.column_names}")
    if config.max_source_length < 1 or config.max_target_length < 1:
        raise ValueError(
            f"max_source_length and max_target_length must be >= 1, got "
            f"{config.max_source_length} and {config.max_target_length}"
        )


def _tokenize_kwargs(tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> dict:
    # Tokens the model needs at position 0 (ChatGLM's [gMASK] sop, BOS): the tokenizer's own prefix
    # (custom ChatGLM tokenizers don't list [gMASK]/sop as special) plus its declared special tokens.
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    protected = sorted(set(tokenizer.all_special_ids) | set(added))
    return {
        "tokenizer": tokenizer,
        "max_source_length": config.max_source_length,
        "max_target_length": config.max_target_length,
        "protected_ids": protected,
    }


def _is_kept(empty_response: bool) -> bool:
    return not empty_response


def _tokenize_training_example(
    example: dict,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int,
    max_target_length: int,
    protected_ids: list[int],
) -> dict:
    messages = example["messages"]
    if not messages[-1]["content"].strip():
        return {
            "input_ids": [],
            "labels": [],
            "prompt_truncated": False,
            "response_truncated": False,
            "empty_response": True,
        }
    context, response_text = _segments(messages, tokenizer)
    ids, labels, prompt_truncated = _encode_prompt(context, tokenizer, max_source_length, protected_ids)
    response = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    response_truncated = len(response) > max_target_length
    response = response[:max_target_length]
    # Templates that close the turn with eos themselves (ChatML's <|im_end|>) need no second one.
    if tokenizer.eos_token_id not in response:
        response.append(tokenizer.eos_token_id)
    return {
        "input_ids": ids + response,
        "labels": labels + response,
        "prompt_truncated": prompt_truncated,
        "response_truncated": response_truncated,
        "empty_response": False,
    }


def _tokenize_generation_example(
    example: dict,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int,
    max_target_length: int,
    protected_ids: list[int],
) -> dict:
    ids = _prompt_ids(example["messages"], tokenizer, max_source_length, protected_ids)
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "label_text": example["messages"][-1]["content"],
    }


def _prompt_ids(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, limit: int, protected_ids: list[int]
) -> list[int]:
    """The tokens before the final response of ``messages``, cut to ``limit``."""
    context, _ = _segments(messages, tokenizer)
    ids, _, _ = _encode_prompt(context, tokenizer, limit, protected_ids)
    return ids


def _encode_prompt(
    context: list[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase, limit: int, protected_ids: list[int]
) -> tuple[list[int], list[int], bool]:
    """Tokenize the context segments piece by piece, then cut to ``limit`` keeping the end."""
    plain = not _has_chat_template(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, supervised) in enumerate(context):
        # A chat template writes its special prefix into the text; the plain format lets the
        # tokenizer add it, once, at the very start.
        piece = tokenizer(text, add_special_tokens=plain and i == 0)["input_ids"]
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    if len(ids) <= limit:
        return ids, labels, False
    # Keep the END: the query being answered and the latest turns sit there, whereas the official
    # right-truncation would cut the current question (and the "答：" cue) and keep stale history.
    # The leading special tokens stay, since the model expects them at position 0.
    head = 0
    protected = set(protected_ids)
    while head < min(limit, len(ids)) and ids[head] in protected:
        head += 1
    start = len(ids) - (limit - head)
    return ids[:head] + ids[start:], labels[:head] + labels[start:], True


# --------------------------------------------------------------------------------------------- prompts


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _segments(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> tuple[list[tuple[str, bool]], str]:
    """Split a conversation into ``(text, supervised)`` context pieces and the final response text."""
    if _has_chat_template(tokenizer):
        pieces = _template_pieces(messages, tokenizer)
    else:
        pieces = _plain_pieces(messages)
    context: list[tuple[str, bool]] = []
    for text, supervised in pieces[:-1]:
        if context and context[-1][1] == supervised:
            context[-1] = (context[-1][0] + text, supervised)
        elif text:
            context.append((text, supervised))
    return context, pieces[-1][0]


def _template_pieces(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Render growing prefixes of the conversation; each assistant turn is the text its render adds.

    This needs the template to be append-only: rendering more messages (or the generation prompt)
    may only extend the text of fewer. Templates that rewrite earlier turns (drop reasoning from old
    answers, stamp the date at the end...) break that, and are rejected rather than mis-labelled.
    """
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:k], generation_prompt=True)
            pieces.append((_extension(rendered, header, k, "adding the generation prompt"), False))
            rendered = header
        longer = _render(tokenizer, messages[: k + 1], generation_prompt=False)
        pieces.append((_extension(rendered, longer, k, "adding the message"), message["role"] == "assistant"))
        rendered = longer
    return pieces


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _extension(shorter: str, longer: str, index: int, action: str) -> str:
    if not longer.startswith(shorter):
        raise ValueError(
            f"the tokenizer's chat template is not append-only: {action} at message {index} changes the "
            f"text rendered for the earlier messages ({shorter[-60:]!r} is not a prefix of {longer[-80:]!r}), "
            "so assistant turns cannot be located; fix the template or drop it to use the plain format"
        )
    return longer[len(shorter) :]


def _plain_pieces(messages: list[dict]) -> list[tuple[str, bool]]:
    roles = [m["role"] for m in messages]
    expected = ["user", "assistant"] * (len(messages) // 2)
    if roles != expected:
        raise ValueError(
            f"the plain prompt format (tokenizer without a chat template) needs alternating user/assistant "
            f"turns starting with user, got roles {roles}; give the tokenizer a chat template for other roles"
        )
    pieces: list[tuple[str, bool]] = []
    for i in range(0, len(messages), 2):
        separator = "\n\n" if i else ""  # closes the previous round's "答：{response}\n\n"
        pieces.append((f"{separator}[Round {i // 2 + 1}]\n\n问：{messages[i]['content']}\n\n答：", False))
        pieces.append((messages[i + 1]["content"], True))
    return pieces
