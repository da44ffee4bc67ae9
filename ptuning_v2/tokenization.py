"""A ChatGLM3-compatible tokenizer that needs neither remote code nor the ``sentencepiece`` runtime.

THUDM's ``tokenization_chatglm.py`` wraps a SentencePiece model: ids ``0..n-1`` are the SentencePiece
pieces, nine special tokens follow, ``encode`` prepends ``[gMASK] sop`` and a chat message is
``<|role|>`` + ``sp.encode(metadata + "\\n")`` + ``sp.encode(content)``. That file is remote code, which
transformers 5 cannot run, so :func:`build_chatglm_tokenizer` rebuilds the same encoding as a native
``tokenizers`` pipeline (saved as ``tokenizer.json``) that ``AutoTokenizer.from_pretrained`` loads as is.

How the SentencePiece behaviour is reproduced (per special-token-delimited segment, like ChatGLM3's
``encode_special_tokens`` path):

- normaliser: the model's precompiled charsmap, then (if the model asks for it) removal of leading,
  trailing and repeated spaces, then the dummy prefix ``▁`` and space escaping. The prefix is added by the
  normaliser, not by ``Metaspace``, because ``Metaspace`` skips it when the text already starts with a
  space, which SentencePiece does not.
- pre-tokeniser: split before every ``▁`` when the model was trained with ``split_by_whitespace`` (the
  default), so no piece can cross a word boundary, exactly as in SentencePiece's own vocabulary.
- model: ``Unigram`` with the same scores (or ``BPE`` with merges ordered by score) and byte fallback.

Known, documented differences from ``sentencepiece`` itself (none occurs in ordinary text):

- the literal strings ``<unk>``, ``<s>``, ``</s>`` and the nine special tokens are read as special tokens
  (so they stay atomic and can be written in a prompt); ``sop``/``eop`` only as whole words, so
  ``people`` or ``Aesop`` are untouched;
- a literal byte-piece string such as ``<0x41>`` in the text would match that piece, which SentencePiece
  never does;
- SentencePiece BPE models are converted with merges ranked by piece score; ties may be broken
  differently from SentencePiece (Unigram models, the ones trained here, are exact, and a BPE model
  matched SentencePiece on every test string tried);
- user-defined symbols, if a model has any, are scored like ordinary pieces, whereas SentencePiece always
  prefers them (the models trained in this repository have none);
- ``decode(..., skip_special_tokens=False)`` keeps the space that marks a word start right after a special
  token, where ChatGLM3's decoder drops it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPIECE_UNDERLINE = "▁"
# Order matters: the i-th entry gets id ``sp.vocab_size() + i``, as in ChatGLM3's SPTokenizer.
CHATGLM_SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")
# Plain words: matching them inside other words would break ordinary English text.
_WORD_SPECIAL_TOKENS = frozenset({"sop", "eop"})

# After each role token comes ``metadata + "\n"`` and then the content. ChatGLM3 encodes the two with
# separate ``sp.encode`` calls, i.e. each gets its own dummy-prefix ``▁``. Rendering ``"\n " + content``
# gives the same pieces: the space becomes the content's ``▁`` and, because pieces never cross a ``▁``
# (split_by_whitespace), the header and the content are segmented independently. Empty content encodes
# to nothing, hence the ``if``.
CHATGLM3_CHAT_TEMPLATE = (
    "{{ '[gMASK]sop' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'observation'] %}"
    "{{ raise_exception('ChatGLM3 roles are system, user, assistant and observation') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{{ message['metadata'] if message['metadata'] is defined and message['metadata'] else '' }}"
    "{{ '\\n' }}"
    "{% if message['content'] %}{{ ' ' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _load_sp_proto(sp_model_file: str) -> Any:
    # sentencepiece ships the protobuf bindings for its model file; only conversion needs it.
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    with open(sp_model_file, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _normalizer(spec: Any) -> normalizers.Normalizer | None:
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # SentencePiece strips and collapses only U+0020 (after the charsmap), not every Unicode space.
        steps.append(normalizers.Replace(Regex(r"\A +| +\z"), ""))
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    return normalizers.Sequence(steps) if steps else None


def _model(proto: Any) -> models.Model:
    spec = proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == 1:  # UNIGRAM
        return models.Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    if spec.model_type == 2:  # BPE
        from transformers.convert_slow_tokenizer import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = generate_merges(vocab, {piece: score for piece, score in pieces})
        return models.BPE(
            vocab,
            merges,
            unk_token=proto.pieces[spec.unk_id].piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    raise NotImplementedError(f"SentencePiece model_type {spec.model_type} is not supported")


def _decoder(add_dummy_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def _backend_tokenizer(proto: Any) -> Tokenizer:
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.treat_whitespace_as_suffix:
        raise NotImplementedError("treat_whitespace_as_suffix SentencePiece models are not supported")
    tok = Tokenizer(_model(proto))
    normalizer = _normalizer(norm)
    if normalizer is not None:
        tok.normalizer = normalizer
    if spec.split_by_whitespace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(SPIECE_UNDERLINE, prepend_scheme="never", split=True)
    tok.decoder = _decoder(norm.add_dummy_prefix)
    return tok


def _special_added_tokens(proto: Any) -> list[AddedToken]:
    # sentencepiece's own control/unknown pieces (<unk>, <s>, </s>) keep their ids; listing them first
    # makes them atomic without shifting the ChatGLM ids that follow the vocabulary.
    control = [p.piece for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
    tokens = [AddedToken(t, special=True, normalized=False) for t in control]
    tokens += [
        AddedToken(t, special=True, normalized=False, single_word=t in _WORD_SPECIAL_TOKENS)
        for t in CHATGLM_SPECIAL_TOKENS
    ]
    return tokens


def build_chatglm_tokenizer(
    sp_model_file: str | os.PathLike[str],
    chat_template: bool = True,
    model_max_length: int = 8192,
) -> PreTrainedTokenizerBase:
    """Build a ChatGLM3-compatible fast tokenizer from a SentencePiece ``.model`` file.

    ids ``0..n-1`` are the SentencePiece pieces and ``n..n+8`` the tokens of
    :data:`CHATGLM_SPECIAL_TOKENS`; ``tokenizer(text)`` gives ``[gMASK], sop`` + ``sp.encode(text)``;
    eos is ``</s>``, pad is ``<unk>`` (as in ChatGLM3), padding on the left. With ``chat_template`` the
    ChatGLM3 template :data:`CHATGLM3_CHAT_TEMPLATE` is attached. The result saves with
    ``save_pretrained`` and reloads with plain ``AutoTokenizer.from_pretrained``.
    """
    proto = _load_sp_proto(os.fspath(sp_model_file))
    n_pieces = len(proto.pieces)
    backend = _backend_tokenizer(proto)
    backend.add_special_tokens(_special_added_tokens(proto))
    for i, token in enumerate(CHATGLM_SPECIAL_TOKENS):
        assert backend.token_to_id(token) == n_pieces + i, f"{token} did not get id {n_pieces + i}"

    gmask, sop = "[gMASK]", "sop"
    eos = proto.pieces[proto.trainer_spec.eos_id].piece
    # ChatGLM3's build_inputs_with_special_tokens: [gMASK] sop A, and [gMASK] sop A B </s> for pairs.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{gmask} {sop} $A",
        pair=f"{gmask} {sop} $A $B {eos}",
        special_tokens=[(t, backend.token_to_id(t)) for t in (gmask, sop, eos)],
    )
    spec = proto.trainer_spec
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=proto.pieces[spec.unk_id].piece,
        bos_token=proto.pieces[spec.bos_id].piece if spec.bos_id >= 0 else None,
        eos_token=eos,
        pad_token=proto.pieces[spec.unk_id].piece,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        tokenizer.chat_template = CHATGLM3_CHAT_TEMPLATE
    return tokenizer


def _special_ids(tokenizer: Any) -> dict[str, int]:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return {t: tokenizer.convert_tokens_to_ids(t) for t in CHATGLM_SPECIAL_TOKENS}
    n = tokenizer.vocab_size()  # a sentencepiece.SentencePieceProcessor
    return {t: n + i for i, t in enumerate(CHATGLM_SPECIAL_TOKENS)}


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def chatglm3_message_ids(
    tokenizer: Any,
    messages: Iterable[Mapping[str, Any]],
    add_generation_prompt: bool = False,
) -> list[int]:
    """Reference ChatGLM3 chat encoding, written in plain Python after ``build_single_message``.

    ``[gMASK], sop`` then, per message, ``[<|role|>] + enc(metadata + "\\n") + enc(content)``, and
    ``<|assistant|>`` for a generation prompt. ``tokenizer`` is either a
    ``sentencepiece.SentencePieceProcessor`` (special ids follow its vocabulary, an encoding independent
    of the fast tokenizer) or a transformers tokenizer built by :func:`build_chatglm_tokenizer`.
    ChatGLM3's extra handling of ``tools`` in system messages is not reproduced.

    :data:`CHATGLM3_CHAT_TEMPLATE` gives exactly these ids, with two documented exceptions: a message
    whose text contains a special-token string literally (``<|user|>``...) gets that special token from the
    template but plain pieces here, and a SentencePiece model trained with ``split_by_whitespace=False``
    could merge the header's newline with the content's leading ``▁``.
    """
    special = _special_ids(tokenizer)
    ids = [special["[gMASK]"], special["sop"]]
    for message in messages:
        role = message["role"]
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown ChatGLM3 role {role!r}")
        ids.append(special[f"<|{role}|>"])
        ids += _plain_ids(tokenizer, (message.get("metadata") or "") + "\n")
        ids += _plain_ids(tokenizer, message["content"])
    if add_generation_prompt:
        ids.append(special["<|assistant|>"])
    return ids


def chat_template_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
) -> list[int]:
    """``apply_chat_template`` ids as a flat list (transformers 5 may return a ``BatchEncoding``)."""
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)
