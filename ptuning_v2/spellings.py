"""How users may spell a boolean, a dtype or "no quantization", in one place (torch-free: the planner and the shell
scripts read it too).

    python -m ptuning_v2.spellings bool VALUE   # prints true or false; exit status 1 for anything else
"""

from __future__ import annotations

import argparse
import sys

BOOLEAN_WORDS = {
    **dict.fromkeys(("true", "1", "yes", "y", "on", "t"), True),
    **dict.fromkeys(("false", "0", "no", "n", "off", "f"), False),
}
# Canonical dtype names (the planner's bytes, the loaders' torch dtypes) and the other names each goes by.
DTYPE_NAMES = ("fp32", "bf16", "fp16")
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
# A full-precision backbone: the values --quantization_bit takes for "none" (16/32 as THUDM's scripts wrote it).
NO_QUANTIZATION = (None, "", "none", "None", 16, 32, "16", "32")
QUANTIZATION_BITS = (4, 8)


class SpellingError(argparse.ArgumentTypeError, ValueError):
    """A value spelled in none of the accepted ways; argparse shows the message as it is."""


def parse_bool(value: str | bool) -> bool:
    """A boolean flag's value: true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    try:
        return BOOLEAN_WORDS[str(value).strip().lower()]
    except KeyError:
        raise SpellingError(f"expected true or false (also 1/0, yes/no, on/off), got {value!r}") from None


def canonical_dtype(name: str) -> str | None:
    """``fp32``/``bf16``/``fp16`` for any name of them (any case), None for anything else."""
    word = str(name).lower()
    word = DTYPE_ALIASES.get(word, word)
    return word if word in DTYPE_NAMES else None


def dtype_choices() -> list[str]:
    return [*DTYPE_NAMES, *DTYPE_ALIASES]


def parse_quantization(value: int | str | None) -> int | None:
    """None for a full-precision backbone, 4 or 8 for bitsandbytes; SpellingError otherwise."""
    if value in NO_QUANTIZATION:
        return None
    if str(value) in {str(bits) for bits in QUANTIZATION_BITS}:
        return int(value)
    raise SpellingError(f"quantization_bit must be 4, 8 or none, got {value!r}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "bool":
        sys.exit("usage: python -m ptuning_v2.spellings bool VALUE")
    try:
        print("true" if parse_bool(sys.argv[2]) else "false")
    except SpellingError:
        sys.exit(1)
