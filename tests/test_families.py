"""The prefix across decoder families: MHA, GQA, MQA, explicit head widths, ALiBi; tiny random models.

For each supported family: the table's geometry is what the model's own cache holds; PEFT computes our logits
from the same table (PEFT's position convention); gradient checkpointing changes neither loss nor prefix
gradients; a left-padded batch generates what each prompt generates alone. Families that cannot carry a prefix
are refused by ``attach_prefix`` with the reason.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import EOS, PAD, VOCAB

from ptuning_v2 import PrefixConfig, attach_prefix, export_peft_adapter, kv_shape_from_config
from ptuning_v2.compat import output_cache

P = 4
_TINY = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, tie_word_embeddings=False)
# Llama-style names: hidden 32, 2 layers, 4 query heads.
_LLAMA = dict(
    _TINY,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
)
# GPT-2 lineage names (n_embd, n_layer, n_head); dropout off so training forwards are deterministic.
_GPT2 = dict(
    _TINY, n_embd=32, n_layer=2, n_head=4, n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0
)

# family -> (config class, model class, config fields, cache geometry expected: (num_kv_heads, head_dim))
FAMILIES = {
    "glm": ("GlmConfig", "GlmForCausalLM", dict(_LLAMA, num_key_value_heads=2, head_dim=8), (2, 8)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(_LLAMA, num_key_value_heads=2, head_dim=8), (2, 8)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, num_key_value_heads=2), (2, 8)),
    "mistral_mqa": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA, num_key_value_heads=1), (1, 8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA, num_key_value_heads=2), (2, 8)),
    # An explicit head_dim that is not hidden_size / num_attention_heads.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA, num_key_value_heads=2, head_dim=16), (2, 16)),
    "gemma_mqa": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(_LLAMA, num_key_value_heads=1, head_dim=16),
        (1, 16),
    ),
    # Alternating sliding/full layers, logit soft-capping.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(_LLAMA, num_key_value_heads=2, head_dim=16),
        (2, 16),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA, num_key_value_heads=2), (2, 8)),
    # Partial rotary embeddings.
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_LLAMA, num_key_value_heads=2), (2, 8)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_LLAMA, num_key_value_heads=2), (2, 8)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_LLAMA, hidden_dropout=0.0), (4, 8)),
    "starcoder2": (
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        dict(_LLAMA, num_key_value_heads=2, residual_dropout=0.0, embedding_dropout=0.0),
        (2, 8),
    ),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(_LLAMA, num_key_value_heads=2), (2, 8)),
    # Falcon-7B layout: multi_query=True, one key/value head; num_kv_heads is ignored by the model then.
    "falcon_mqa": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(_LLAMA, multi_query=True, num_kv_heads=1, new_decoder_architecture=False, alibi=False),
        (1, 8),
    ),
    # Falcon-40B layout: 2 kv groups in the weights, broadcast to all 4 heads before they are cached.
    "falcon_40b": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(_LLAMA, new_decoder_architecture=True, num_kv_heads=2, alibi=False),
        (4, 8),
    ),
    # StarCoder/SantaCoder layout: multi_query=True, one key/value head, separate key and value tensors.
    "gpt_bigcode_mqa": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(_GPT2, multi_query=True), (1, 8)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT2, (4, 8)),
    # Falcon-RW layout: ALiBi over the attention mask instead of rotary embeddings.
    "falcon_alibi_mqa": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(_LLAMA, multi_query=True, new_decoder_architecture=False, alibi=True),
        (1, 8),
    ),
    # ALiBi over the attention mask, and a forward that takes no position_ids.
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(_TINY, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0),
        (4, 8),
    ),
}
# ALiBi over the mask ignores position_ids: the ChatGLM convention (real tokens from 0) cannot be applied.
PEFT_CONVENTION_ONLY = {"bloom", "falcon_alibi_mqa"}


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    config_name, model_name, fields, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**fields)
    return getattr(transformers, model_name)(config).eval()


def convention(family: str) -> str:
    return "peft" if family in PEFT_CONVENTION_ONLY else "chatglm"


def prefixed(family: str, position_convention: str | None = None) -> torch.nn.Module:
    model = tiny(family)
    config = PrefixConfig(
        pre_seq_len=P, prefix_dropout=0.0, position_convention=position_convention or convention(family)
    )
    attach_prefix(model, config)
    torch.manual_seed(100)
    torch.nn.init.normal_(model.tuning.encoder.embedding.weight, std=0.5)  # non-trivial prefix values
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_is_what_the_cache_holds(family):
    """The table's (kv heads, head_dim) is what the model's own cache holds, read from a real forward."""
    model = tiny(family)
    shape = kv_shape_from_config(model.config)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (2, *FAMILIES[family][3])
    with torch.no_grad():
        out = model(input_ids=random_ids(1, 3), use_cache=True)
    for layer in output_cache(out).layers:
        assert layer.keys.shape == layer.values.shape == (1, shape.num_kv_heads, 3, shape.head_dim)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_as_peft(tmp_path, family):
    """PEFT, given our exported table, computes our logits (PEFT's convention: real tokens from P on)."""
    from peft import PeftModel

    ours = prefixed(family, position_convention="peft")
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
    export_peft_adapter(ours, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny(family), tmp_path).eval()
    with torch.no_grad():
        actual = peft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()
    # and the prefix matters: without it the logits differ
    with torch.no_grad():
        assert not torch.allclose(tiny(family)(input_ids=ids).logits, expected, atol=1e-3)


# GPT-2's decoder loop passes no cache to its layers under gradient checkpointing: refused (see below).
CHECKPOINTING_REFUSED = {"gpt2"}


@pytest.mark.parametrize("family", [family for family in FAMILIES if family not in CHECKPOINTING_REFUSED])
def test_gradient_checkpointing_matches_plain(family):
    ids = random_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    results = []
    for checkpointing in (False, True):
        model = prefixed(family)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results.append((loss.detach(), model.tuning.encoder.embedding.weight.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert grad_a.abs().sum() > 0
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    assert torch.allclose(grad_a, grad_b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", sorted(CHECKPOINTING_REFUSED))
def test_checkpointing_that_drops_the_cache_is_refused(family):
    model = prefixed(family)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="drops its cache when training under gradient checkpointing"):
        model(input_ids=ids, labels=ids)
    model.activation_checkpointing_disable()  # without it, training works
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.tuning.encoder.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_generates_like_one_by_one(family):
    model = prefixed(family)
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 7, 1)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    kwargs = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]
    for row, prompt in enumerate(prompts):
        single = model.generate(input_ids=prompt[None], **kwargs)[0, len(prompt) :]
        assert torch.equal(batched[row], single), row


@pytest.mark.xfail(
    raises=RuntimeError,
    strict=False,
    reason="peft 0.21.2 sizes a prefix from num_attention_heads unless the config has num_key_value_heads: "
    "for Falcon with multi_query (one cached kv head) it builds 4 heads and attention fails ('Sizes of "
    "tensors must match'). The adapter export_peft_adapter writes states the geometry and works in PEFT "
    "(test_same_logits_as_peft).",
)
def test_peft_own_sizing_of_falcon_multi_query():
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(
        tiny("falcon_mqa"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    peft_model(input_ids=random_ids(2, 5))


# ---------------------------------------------------------------- geometry read from configs alone


def test_falcon_multi_query_reads_one_kv_head():
    """Issue 11: multi_query=True with num_kv_heads=1 used to get one kv head per query head."""
    config = transformers.FalconConfig(**FAMILIES["falcon_mqa"][2])
    assert kv_shape_from_config(config).geometry == (2, 1, 8)
    # num_kv_heads is what the config reports for the non-MQA layout; the model ignores it under multi_query
    config = transformers.FalconConfig(**{**FAMILIES["falcon_mqa"][2], "num_kv_heads": None})
    assert config.num_kv_heads == 4
    assert kv_shape_from_config(config).geometry == (2, 1, 8)
    config = transformers.FalconConfig(
        **{**FAMILIES["falcon_mqa"][2], "multi_query": False, "num_kv_heads": None}
    )
    assert kv_shape_from_config(config).geometry == (2, 4, 8)


def test_heterogeneous_layers_are_refused():
    """Gemma 4 keeps different head widths in its sliding and full layers: no single table fits."""
    config = transformers.Gemma4TextConfig(**_LLAMA, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"layers of Gemma4TextConfig differ in \(num_kv_heads, head_dim\)"):
        kv_shape_from_config(config)


# ---------------------------------------------------------------- refusals

MAMBA = dict(_TINY, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2)
REFUSED = {
    # state-space: the cache holds a recurrent and a convolution state per layer, no per-token keys
    # (transformers 5.24 types its layers 'linear_attention'; 5.23's forward takes `cache_params` instead)
    "mamba": (
        "MambaConfig",
        "MambaForCausalLM",
        MAMBA,
        r"'linear_attention' layers hold a recurrent state|takes no key/value cache",
    ),
    # hybrid: Jamba's Mamba layers sit between its attention layers
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            _LLAMA,
            num_key_value_heads=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            num_experts=2,
            mamba_d_state=4,
            mamba_dt_rank=4,
        ),
        r"'linear_attention' layers hold a recurrent state",
    ),
    # RWKV's forward takes a recurrent `state`, no key/value cache at all
    "rwkv": (
        "RwkvConfig",
        "RwkvForCausalLM",
        dict(_TINY, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64),
        r"takes no key/value cache",
    ),
    # multi-head latent attention: keys qk_nope + qk_rope wide, values v_head_dim
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            _LLAMA,
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            first_k_dense_replace=2,
        ),
        r"multi-head latent attention",
    ),
    # ALiBi by cache slot: left padding would sit between the prefix and the tokens
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        dict(_TINY, d_model=32, n_layers=2, n_heads=4),
        r"numbers positions by cache slot",
    ),
    # KV sharing: Gemma 3n's last layers read the cache of earlier ones and keep none of their own
    "gemma3n": (
        "Gemma3nTextConfig",
        "Gemma3nForCausalLM",
        dict(
            _LLAMA,
            num_hidden_layers=4,
            num_key_value_heads=2,
            head_dim=8,
            num_kv_shared_layers=2,
            layer_types=["sliding_attention", "full_attention"] * 2,
            laurel_rank=4,
            hidden_size_per_layer_input=8,
            activation_sparsity_pattern=[0.0] * 4,
        ),
        r"'dummy' layers hold nothing of their own",
    ),
    # an encoder run left to right
    "bert": (
        "BertConfig",
        "BertLMHeadModel",
        dict(
            _TINY,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            is_decoder=True,
        ),
        r"'bert' is an encoder family",
    ),
}


@pytest.mark.parametrize("family", REFUSED)
def test_families_without_a_key_value_cache_are_refused(family):
    config_name, model_name, fields, reason = REFUSED[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields))
    with pytest.raises((TypeError, ValueError), match=reason):
        attach_prefix(model, PrefixConfig(pre_seq_len=P, position_convention="peft"))
    assert not hasattr(model, "prefix_encoder")


@pytest.mark.parametrize("family", sorted(PEFT_CONVENTION_ONLY))
def test_alibi_over_the_mask_refuses_the_chatglm_convention(family):
    """Positions come from the mask: real tokens cannot start at 0 with the prefix before them."""
    model = tiny(family)
    with pytest.raises(TypeError, match=r"position_convention='peft'"):
        attach_prefix(model, PrefixConfig(pre_seq_len=P, position_convention="chatglm"))
    assert not hasattr(model, "prefix_encoder")
