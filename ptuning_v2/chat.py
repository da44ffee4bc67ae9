"""Chat with a model and a trained prefix in the terminal (multi-turn, streamed).

    python -m ptuning_v2.chat --model models/glm-zh-tiny --checkpoint output/ner-ptuning_v2-16-2e-2
    python -m ptuning_v2.chat --model ... --checkpoint ... --query "找出句中的人名、地名和机构名：李鹏在北京会见了新华社记者。"

Commands in the session: ``clear`` forgets the history, ``exit`` leaves.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import TextStreamer

from .data import generation_prompt_ids
from .evaluate import parse_bool
from .generation import GenerationSettings, generate_kwargs
from .loading import load_model, load_tokenizer


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict[str, str]], args: argparse.Namespace, stream: bool) -> str:
    ids = torch.tensor(
        [generation_prompt_ids(messages, tokenizer)], device=model.get_input_embeddings().weight.device
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        top_p=args.top_p,
        temperature=args.temperature,
    )
    kwargs = generate_kwargs(settings, tokenizer)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/glm-zh-tiny")
    parser.add_argument(
        "--checkpoint", default=None, help="prefix checkpoint (ours, official ChatGLM or PEFT)"
    )
    parser.add_argument("--quantization_bit", default=None)
    parser.add_argument("--query", default=None, help="answer one query and exit")
    parser.add_argument("--system", default=None, help="a system message for the conversation")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument(
        "--do_sample",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="sample (official top_p 0.7, temperature 0.95); alone, or with true/false",
    )
    parser.add_argument("--top_p", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.95)
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.checkpoint, args.quantization_bit)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.query is not None:
        print(
            reply(model, tokenizer, [*history, {"role": "user", "content": args.query}], args, stream=False)
        )
        return
    print("prefix:", args.checkpoint or "none", "| 'clear' forgets the history, 'exit' leaves")
    while True:
        try:
            query = input("\n用户: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if query in ("exit", "quit"):
            return
        if query == "clear":
            history = history[:1] if args.system else []
            continue
        if not query:
            continue
        history.append({"role": "user", "content": query})
        print("助手: ", end="", flush=True)
        answer = reply(model, tokenizer, history, args, stream=True)
        history.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # OSError: missing files, Hub/loading errors
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
