"""``python -m ptuning_v2.methods``: the methods' names on one line (the shell scripts' choices)."""

from .catalog import CATALOG

print(" ".join(CATALOG))
