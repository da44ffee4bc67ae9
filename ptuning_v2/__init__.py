"""P-Tuning v2 and Prefix-Tuning for ChatGLM-style (MQA/GQA) decoders on transformers 5."""
