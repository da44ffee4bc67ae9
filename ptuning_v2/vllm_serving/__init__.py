"""Serving prefixes on vLLM: P-Tuning v2 / Prefix-Tuning / virtual-token checkpoints, many in one batch.

vLLM pins its own torch and an older transformers, so it runs in its own environment (``scripts/setup_vllm.sh``
makes ``.venv-vllm``). The work is split along that line:

- ``export`` runs in the project's environment: it reads every checkpoint the way ``load_model`` does, turns it
  into the key/value table vLLM's cache must hold, and writes the tables and a manifest (``tables``' format);
- ``connector``, ``routing`` and ``launch`` run inside vLLM and import nothing from the project but ``tables``,
  which needs only torch and safetensors.

A request for a prefix of length P carries P placeholder tokens at the start of its prompt. The connector tells
vLLM's scheduler those P tokens are already computed and writes the prefix's keys and values into the cache
slots vLLM allocated for them, before attention runs; the real tokens then sit at positions P.., as PEFT's
convention has them (ChatGLM's convention is met by storing its keys pre-rotated, see ``export``).
"""
