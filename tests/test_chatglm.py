"""Original ChatGLM2/3 layout -> GlmForCausalLM, checked against a from-the-formulas reference forward."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ptuning_v2.chatglm import (
    ChatGLMConversionError,
    chatglm_to_glm_config,
    is_chatglm_checkpoint,
    load_chatglm_as_glm,
)

REPO = Path(__file__).resolve().parents[1]

TINY_CHATGLM = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 96,
    "num_attention_heads": 4,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "kv_channels": 16,
    "padded_vocab_size": 100,
    "add_qkv_bias": True,
    "add_bias_linear": False,
    "rope_ratio": 2,
    "layernorm_epsilon": 1e-5,
    "seq_length": 128,
    "rmsnorm": True,
    "post_layer_norm": True,
    "original_rope": True,
    "apply_residual_connection_post_layernorm": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


# ------------------------------------------------------------------------------ tiny original checkpoint


def make_chatglm_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the real ChatGLM2/3 key names, scaled so logits are well spread (no greedy ties)."""
    g = torch.Generator().manual_seed(seed)
    hidden, heads, hn = config["hidden_size"], config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    ffn, vocab = config["ffn_hidden_size"], config["padded_vocab_size"]

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def norm():
        return 1.0 + 0.1 * torch.randn(hidden, generator=g)

    w = {"transformer.embedding.word_embeddings.weight": torch.randn(vocab, hidden, generator=g)}
    qkv = (heads + 2 * groups) * hn
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attention.query_key_value.weight"] = lin(qkv, hidden)
        w[p + "self_attention.query_key_value.bias"] = 0.1 * torch.randn(qkv, generator=g)
        w[p + "self_attention.dense.weight"] = lin(hidden, heads * hn)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.dense_h_to_4h.weight"] = lin(2 * ffn, hidden)
        w[p + "mlp.dense_4h_to_h.weight"] = lin(hidden, ffn)
    w["transformer.encoder.final_layernorm.weight"] = norm()
    w["transformer.output_layer.weight"] = 3.0 * lin(vocab, hidden)
    # Real ChatGLM2 checkpoints carry the RoPE buffer; the converter must drop it.
    rot = hn // 2
    w["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    return w


def _shard_keys(weights: dict, n: int) -> list[list[str]]:
    keys = list(weights)
    return [keys[i::n] for i in range(n)]


def write_checkpoint(root: Path, config: dict, weights: dict, layout: str) -> Path:
    """Write ``weights`` as a ChatGLM checkpoint: 'bin' (single file), 'bin-sharded' or 'safetensors-sharded'."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if layout == "bin":
        torch.save(weights, root / "pytorch_model.bin")
        return root
    n = 3
    sharded = layout == "bin-sharded"
    weight_map = {}
    for i, keys in enumerate(_shard_keys(weights, n)):
        name = (
            f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            if sharded
            else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        )
        part = {k: weights[k].contiguous() for k in keys}
        if sharded:
            torch.save(part, root / name)
        else:
            save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = "pytorch_model.bin.index.json" if sharded else "model.safetensors.index.json"
    (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


# --------------------------------------------------------------------------------- reference forward


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope_first_half_interleaved(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """ChatGLM2/3 RoPE on (T, heads, hn): rotate dims [0, hn/2) as pairs (x[2j], x[2j+1]); the rest pass."""
    rot = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angle = positions.to(torch.float64)[:, None] * inv_freq  # (T, rot/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


def _split_fused_qkv(qkv: torch.Tensor, config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, heads, hn = qkv.shape[0], config["num_attention_heads"], config["kv_channels"]
    if config["multi_query_attention"]:
        groups = config["multi_query_group_num"]
        q, k, v = qkv.split([heads * hn, groups * hn, groups * hn], dim=-1)
        return q.view(t, heads, hn), k.view(t, groups, hn), v.view(t, groups, hn)
    q, k, v = qkv.view(t, heads, 3 * hn).split(hn, dim=-1)  # per-head [q, k, v] without MQA
    return q, k, v


def reference_chatglm_forward(
    weights: dict[str, torch.Tensor],
    config: dict,
    input_ids: torch.Tensor,
    prefix_kv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (T, vocab) of one sequence under the original ChatGLM2/3 architecture, in float64.

    ``prefix_kv`` is the official past-key-value table, shape (P, num_layers * 2 * groups * kv_channels) (what
    ``prefix_encoder(arange(P))`` returns). Viewed as (P, 2·num_layers, groups, kv_channels), layer i's keys
    are slot 2i and its values slot 2i+1; they are prepended unrotated and fully visible, while the real
    tokens keep positions 0..T-1.
    """
    w = {k: v.to(torch.float64) for k, v in weights.items()}
    c = config
    heads, hn, eps = c["num_attention_heads"], c["kv_channels"], c["layernorm_epsilon"]
    groups = c["multi_query_group_num"] if c["multi_query_attention"] else heads
    base = 10000.0 * c.get("rope_ratio", 1)
    t = input_ids.shape[0]
    positions = torch.arange(t)
    prefix = None
    if prefix_kv is not None:
        prefix = prefix_kv.to(torch.float64).view(prefix_kv.shape[0], 2 * c["num_layers"], groups, hn)
    n_prefix = 0 if prefix is None else prefix.shape[0]
    # Query t sees every prefix slot and real keys 0..t.
    visible = torch.ones(t, n_prefix + t, dtype=torch.bool)
    visible[:, n_prefix:] = torch.tril(torch.ones(t, t, dtype=torch.bool))

    h = w["transformer.embedding.word_embeddings.weight"][input_ids]
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
        qkv = (
            x @ w[p + "self_attention.query_key_value.weight"].T
            + w[p + "self_attention.query_key_value.bias"]
        )
        q, k, v = _split_fused_qkv(qkv, c)
        q = _rope_first_half_interleaved(q, positions, base)
        k = _rope_first_half_interleaved(k, positions, base)
        if prefix is not None:
            k = torch.cat([prefix[:, 2 * i], k])
            v = torch.cat([prefix[:, 2 * i + 1], v])
        k = k.repeat_interleave(heads // groups, dim=1)  # group j serves query heads j·r .. j·r+r-1
        v = v.repeat_interleave(heads // groups, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hn)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        attn = torch.einsum("hts,shd->thd", probs, v).reshape(t, heads * hn)
        h = h + attn @ w[p + "self_attention.dense.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        a, b = (x @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (F.silu(a) * b) @ w[p + "mlp.dense_4h_to_h.weight"].T
    h = _rms_norm(h, w["transformer.encoder.final_layernorm.weight"], eps)
    return h @ w["transformer.output_layer.weight"].T


def reference_greedy(
    weights: dict,
    config: dict,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    prefix_kv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy decoding by full recomputation (no cache), stopping at eos like ``generate``."""
    ids = input_ids.clone()
    for _ in range(max_new_tokens):
        nxt = reference_chatglm_forward(weights, config, ids, prefix_kv)[-1].argmax()
        ids = torch.cat([ids, nxt[None]])
        if nxt.item() == config["eos_token_id"]:
            break
    return ids


# ---------------------------------------------------------------------------------------------- fixtures

LAYOUTS = ["bin", "bin-sharded", "safetensors-sharded"]
PROMPT = torch.tensor([5, 17, 42, 8, 99, 3, 61, 23])


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return make_chatglm_weights(TINY_CHATGLM)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, weights) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chatglm")
    return {layout: write_checkpoint(root / layout, TINY_CHATGLM, weights, layout) for layout in LAYOUTS}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


# --------------------------------------------------------------------------------------------- config


def test_config_mapping():
    cfg = chatglm_to_glm_config(TINY_CHATGLM)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 96)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.vocab_size == 100 and cfg.max_position_embeddings == 128 and cfg.rms_norm_eps == 1e-5
    assert cfg.attention_bias is True and cfg.tie_word_embeddings is False
    assert cfg.rope_parameters["rope_theta"] == 20000.0
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5
    assert (cfg.pad_token_id, cfg.eos_token_id) == (0, 2)
    no_mqa = chatglm_to_glm_config({**TINY_CHATGLM, "multi_query_attention": False})
    assert no_mqa.num_key_value_heads == 4
    no_ratio = {k: v for k, v in TINY_CHATGLM.items() if k != "rope_ratio"}
    assert chatglm_to_glm_config(no_ratio).rope_parameters["rope_theta"] == 10000.0


@pytest.mark.parametrize(
    "field,value",
    [
        ("rmsnorm", False),
        ("apply_residual_connection_post_layernorm", True),
        ("post_layer_norm", False),
        ("original_rope", False),
        ("add_bias_linear", True),
    ],
)
def test_unsupported_variant_names_field(field, value):
    with pytest.raises(ChatGLMConversionError, match=field):
        chatglm_to_glm_config({**TINY_CHATGLM, field: value})


def test_is_chatglm_checkpoint(checkpoints, tmp_path):
    assert is_chatglm_checkpoint(checkpoints["bin"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_chatglm_checkpoint(tmp_path)
    assert not is_chatglm_checkpoint(tmp_path / "nowhere")


# -------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_reference(checkpoints, weights, layout):
    model, prefix = load_chatglm_as_glm(checkpoints[layout])
    assert prefix is None
    assert type(model).__name__ == "GlmForCausalLM"
    expected = reference_chatglm_forward(weights, TINY_CHATGLM, PROMPT)
    assert (_logits(model, PROMPT).double() - expected).abs().max() < 1e-4


def test_greedy_generation_matches_reference(checkpoints, weights):
    model, _ = load_chatglm_as_glm(checkpoints["bin"])
    expected = reference_greedy(weights, TINY_CHATGLM, PROMPT, max_new_tokens=12)
    with torch.no_grad():
        out = model.generate(PROMPT[None], max_new_tokens=12, do_sample=False)[0]
    assert out.tolist() == expected.tolist()


def test_without_multi_query_attention(tmp_path):
    config = {**TINY_CHATGLM, "multi_query_attention": False}
    weights = make_chatglm_weights(config, seed=1)
    model, _ = load_chatglm_as_glm(write_checkpoint(tmp_path, config, weights, "bin"))
    expected = reference_chatglm_forward(weights, config, PROMPT)
    assert (_logits(model, PROMPT).double() - expected).abs().max() < 1e-4


def test_dtype_cast_and_prefix_set_aside(tmp_path, weights):
    prefix = {"transformer.prefix_encoder.embedding.weight": torch.randn(4, 2 * 2 * 2 * 16)}
    src = write_checkpoint(tmp_path, TINY_CHATGLM, {**weights, **prefix}, "bin")
    model, got = load_chatglm_as_glm(src, torch_dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16
    assert set(got) == set(prefix)
    assert torch.equal(got["transformer.prefix_encoder.embedding.weight"], prefix[next(iter(prefix))])
    assert not any("prefix" in n for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------- CLI


def test_convert_cli_round_trip(checkpoints, weights, tmp_path):
    from transformers import AutoModelForCausalLM

    dst = tmp_path / "native"
    subprocess.run(
        [sys.executable, "-m", "ptuning_v2.convert", str(checkpoints["safetensors-sharded"]), str(dst)]
        + ["--max-shard-size", "100KB"],
        check=True,
        cwd=REPO,
    )
    names = sorted(p.name for p in dst.iterdir())
    assert "config.json" in names and "generation_config.json" in names
    assert (
        "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 1
    )
    assert not list(tmp_path.glob(".*tmp*")), "temporary directory left behind"
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert type(model).__name__ == "GlmForCausalLM"
    expected = reference_chatglm_forward(weights, TINY_CHATGLM, PROMPT)
    assert (_logits(model, PROMPT).double() - expected).abs().max() < 1e-4


def test_convert_dtype_flag(checkpoints, tmp_path):
    from ptuning_v2.convert import main

    dst = tmp_path / "bf16"
    main([str(checkpoints["bin"]), str(dst), "--dtype", "bf16"])
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert (dst / "model.safetensors").is_file()


def test_convert_refuses_existing_destination(checkpoints, tmp_path):
    from ptuning_v2.convert import main

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(SystemExit):
        main([str(checkpoints["bin"]), str(tmp_path / "taken")])
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


# -------------------------------------------------------------------------------------------- errors


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CHATGLM, "model_type": "llama"}))
    with pytest.raises(ChatGLMConversionError, match="model_type is 'llama'"):
        load_chatglm_as_glm(tmp_path)


def test_first_generation_chatglm_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "position_encoding_2d": True}))
    with pytest.raises(ChatGLMConversionError, match="first generation"):
        load_chatglm_as_glm(tmp_path)


@pytest.mark.parametrize("layout", ["bin-sharded", "safetensors-sharded"])
def test_missing_shard_names_index_and_shard(checkpoints, tmp_path, layout):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoints[layout], src)
    victim = sorted(p for p in src.iterdir() if "-00002-of-" in p.name)[0]
    victim.unlink()
    with pytest.raises(ChatGLMConversionError) as err:
        load_chatglm_as_glm(src)
    assert victim.name in str(err.value) and ".index.json" in str(err.value)


def test_wrong_shape_names_file_tensor_and_shapes(tmp_path, weights):
    bad = dict(weights)
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    bad[name] = torch.zeros(64, 95)
    src = write_checkpoint(tmp_path, TINY_CHATGLM, bad, "bin")
    with pytest.raises(ChatGLMConversionError) as err:
        load_chatglm_as_glm(src)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and name in msg and "(64, 95)" in msg and "(64, 96)" in msg


def test_unexpected_and_missing_keys_are_named(tmp_path, weights):
    extra = write_checkpoint(
        tmp_path / "extra", TINY_CHATGLM, {**weights, "transformer.bogus.weight": torch.ones(1)}, "bin"
    )
    with pytest.raises(ChatGLMConversionError, match="transformer.bogus.weight"):
        load_chatglm_as_glm(extra)
    name = "transformer.encoder.layers.0.post_attention_layernorm.weight"
    short = write_checkpoint(
        tmp_path / "short", TINY_CHATGLM, {k: v for k, v in weights.items() if k != name}, "bin"
    )
    with pytest.raises(ChatGLMConversionError, match=name):
        load_chatglm_as_glm(short)


# ------------------------------------------------------------------------------- official prefix checkpoints

PRE_SEQ_LEN = 5


def write_official_ptuning_checkpoint(
    root: Path, projection: bool, seed: int = 7
) -> tuple[Path, torch.Tensor]:
    """An official ``ptuning/`` output dir (prefix tensors only, ChatGLM config with pre_seq_len) and its
    float64 key/value table, computed here independently of ptuning_v2."""
    g = torch.Generator().manual_seed(seed)
    c = TINY_CHATGLM
    kv_size = c["num_layers"] * 2 * c["multi_query_group_num"] * c["kv_channels"]
    emb = torch.randn(PRE_SEQ_LEN, kv_size, generator=g)
    tensors = {"transformer.prefix_encoder.embedding.weight": emb}
    table = emb.double()
    if projection:
        hidden = c["hidden_size"]
        w0 = torch.randn(hidden, kv_size, generator=g) / math.sqrt(kv_size)
        b0 = 0.1 * torch.randn(hidden, generator=g)
        w2 = torch.randn(kv_size, hidden, generator=g)
        b2 = 0.1 * torch.randn(kv_size, generator=g)
        p = "transformer.prefix_encoder.trans."
        tensors.update({p + "0.weight": w0, p + "0.bias": b0, p + "2.weight": w2, p + "2.bias": b2})
        table = torch.tanh(table @ w0.double().T + b0.double()) @ w2.double().T + b2.double()
    root.mkdir(parents=True)
    config = {**c, "pre_seq_len": PRE_SEQ_LEN, "prefix_projection": projection}
    (root / "config.json").write_text(json.dumps(config))
    torch.save(tensors, root / "pytorch_model.bin")
    return root, table


@pytest.mark.parametrize("projection", [False, True], ids=["ptuning_v2", "prefix_projection"])
def test_official_prefix_via_load_model_matches_reference(checkpoints, weights, tmp_path, projection):
    from ptuning_v2 import load_model

    ptuning_dir, table = write_official_ptuning_checkpoint(tmp_path / "pt", projection)
    model = load_model(str(checkpoints["bin"]), ptuning_checkpoint=str(ptuning_dir), torch_dtype="fp32")
    expected = reference_chatglm_forward(weights, TINY_CHATGLM, PROMPT, prefix_kv=table)
    no_prefix = reference_chatglm_forward(weights, TINY_CHATGLM, PROMPT)
    assert (expected - no_prefix).abs().max() > 0.1, "the prefix should matter in this test"
    assert (_logits(model, PROMPT).double() - expected).abs().max() < 1e-4

    greedy = reference_greedy(weights, TINY_CHATGLM, PROMPT, max_new_tokens=10, prefix_kv=table)
    with torch.no_grad():
        out = model.generate(PROMPT[None], max_new_tokens=10, do_sample=False)[0]
    assert out.tolist() == greedy.tolist()


def test_attach_prefix_batch_matches_reference(checkpoints, weights, tmp_path):
    from ptuning_v2 import PrefixConfig, attach_prefix

    _, table = write_official_ptuning_checkpoint(tmp_path / "pt", projection=False)
    model, _ = load_chatglm_as_glm(checkpoints["safetensors-sharded"])
    attach_prefix(model, PrefixConfig(pre_seq_len=PRE_SEQ_LEN))
    with torch.no_grad():
        model.tuning.encoder.embedding.weight.copy_(table.float())
    model.eval()  # the official Dropout(0.1) on the prefix is off at inference
    batch = torch.stack([PROMPT, PROMPT.flip(0)])
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    for row in range(2):
        expected = reference_chatglm_forward(weights, TINY_CHATGLM, batch[row], prefix_kv=table)
        assert (logits[row].double() - expected).abs().max() < 1e-4


def test_convert_official_prefix_then_load(checkpoints, weights, tmp_path):
    """CLI prefix mode: official ptuning dir -> our prefix format, used on the CLI-converted backbone."""
    from ptuning_v2 import load_model, load_prefix_checkpoint
    from ptuning_v2.convert import main

    ptuning_dir, table = write_official_ptuning_checkpoint(tmp_path / "pt", projection=True)
    main([str(checkpoints["bin"]), str(tmp_path / "native")])
    main([str(ptuning_dir), str(tmp_path / "prefix")])
    converted = load_prefix_checkpoint(tmp_path / "prefix")
    assert converted.source == "ptuning_v2" and converted.config.prefix_projection
    assert converted.kv_shape is not None and converted.kv_shape.geometry == (2, 2, 16)
    model = load_model(
        str(tmp_path / "native"), ptuning_checkpoint=str(tmp_path / "prefix"), torch_dtype="fp32"
    )
    expected = reference_chatglm_forward(weights, TINY_CHATGLM, PROMPT, prefix_kv=table)
    assert (_logits(model, PROMPT).double() - expected).abs().max() < 1e-4


def test_convert_full_checkpoint_with_prefix_writes_both(weights, tmp_path):
    from ptuning_v2 import load_prefix_checkpoint
    from ptuning_v2.convert import PREFIX_SUBDIR, main

    ptuning_dir, _ = write_official_ptuning_checkpoint(tmp_path / "pt", projection=False)
    prefix = torch.load(ptuning_dir / "pytorch_model.bin", weights_only=True)
    config = {**TINY_CHATGLM, "pre_seq_len": PRE_SEQ_LEN, "prefix_projection": False}
    src = write_checkpoint(tmp_path / "full", config, {**weights, **prefix}, "bin-sharded")
    main([str(src), str(tmp_path / "out")])
    checkpoint = load_prefix_checkpoint(tmp_path / "out" / PREFIX_SUBDIR)
    assert torch.equal(
        checkpoint.state_dict["embedding.weight"], prefix["transformer.prefix_encoder.embedding.weight"]
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- tokenizer


def test_convert_builds_tokenizer_from_sentencepiece(checkpoints, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from ptuning_v2.convert import main
    from ptuning_v2.tokenization import build_chatglm_tokenizer

    src = tmp_path / "src"
    shutil.copytree(checkpoints["bin"], src)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=40,
        minloglevel=2,
        character_coverage=1.0,
    )
    shutil.copy(tmp_path / "sp.model", src / "tokenizer.model")
    main([str(src), str(tmp_path / "out")])
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    built = build_chatglm_tokenizer(src / "tokenizer.model")
    text = "the lazy fox jumps"
    assert reloaded(text)["input_ids"] == built(text)["input_ids"]
    assert max(reloaded(text)["input_ids"]) < TINY_CHATGLM["padded_vocab_size"]


# bitsandbytes' two CPU paths for 4-bit: with AVX512-BF16 (packed kernel) and without; see test_quantization.py
@pytest.mark.parametrize("path", ["packed", "generic"])
def test_quantized_load_goes_through_a_temporary_native_checkpoint(
    checkpoints, weights, tmp_path, path, monkeypatch
):
    from test_quantization import check_packed_forward_possible, force_cpu_path
    from transformers import BitsAndBytesConfig

    force_cpu_path(monkeypatch, path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model, _ = load_chatglm_as_glm(
        checkpoints["bin"], quantization_config=quant, device="cpu", tmp_dir=tmp_path
    )
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert not list(tmp_path.iterdir()), "the temporary native checkpoint was not removed"
    assert torch.equal(
        model.model.embed_tokens.weight, weights["transformer.embedding.word_embeddings.weight"]
    )
    check_packed_forward_possible(model, path)  # skips from here where the CPU has no packed kernel
    # nf4 on random weights is lossy; the logits must still clearly follow the reference.
    logits = _logits(model, PROMPT).double().flatten()
    expected = reference_chatglm_forward(weights, TINY_CHATGLM, PROMPT).flatten()
    assert F.cosine_similarity(logits, expected, dim=0) > 0.9
    # ffn_hidden_size 96: down_proj's in_features are no multiple of the 4-bit block size (64), so it stays on
    # the generic path while q_proj (64 -> 64) is packed.
    mlp, attention = model.model.layers[0].mlp, model.model.layers[0].self_attn
    assert type(mlp.down_proj).__name__ == "Linear4bit" and not mlp.down_proj.support_avx512bf16_for_cpu
    packed = getattr(attention.q_proj.weight.quant_state, "packing_format_for_cpu", False)
    assert packed == (path == "packed")
