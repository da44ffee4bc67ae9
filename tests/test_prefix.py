"""The P-Tuning v2 core on tiny GLM, GLM-4, Qwen2 (GQA) and Llama-MQA models built here."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CONFIGS, EOS, PAD, random_ids, tiny_classifier, tiny_model
from transformers import DynamicCache

from ptuning_v2 import (
    KVShape,
    PrefixConfig,
    PrefixEncoder,
    attach_prefix,
    bake_prefix,
    export_peft_adapter,
    kv_shape_from_config,
    load_model,
    load_prefix,
    load_prefix_checkpoint,
)
from ptuning_v2.compat import CACHE_NAMES, cache_argument, output_cache

KINDS = list(CONFIGS)
P = 4


def prefixed(kind="glm", projection=False, seed=0, dtype=torch.float32, **config):
    model = tiny_model(kind, seed=seed, dtype=dtype)
    attach_prefix(
        model, PrefixConfig(pre_seq_len=P, prefix_projection=projection, prefix_dropout=0.0, **config)
    )
    torch.manual_seed(seed + 100)
    for param in model.tuning.encoder.parameters():  # non-trivial prefix values
        torch.nn.init.normal_(param, std=0.5)
    return model


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


# ---------------------------------------------------------------- shapes and layout


@pytest.mark.parametrize("kind", KINDS)
def test_kv_shape_and_cache_shapes(kind):
    model = prefixed(kind)
    config = model.config
    shape = kv_shape_from_config(config)
    heads = config.num_key_value_heads
    assert shape == KVShape(config.num_hidden_layers, heads, 8, config.hidden_size)
    assert shape.kv_size == config.num_hidden_layers * 2 * heads * 8
    pairs = model.tuning.encoder(batch_size=3)
    assert len(pairs) == config.num_hidden_layers
    for key, value in pairs:
        assert key.shape == value.shape == (3, heads, P, 8)


def test_chatglm_config_fields_are_read():
    class ChatGLMConfig:  # the fields THUDM's config.json carries
        model_type = "chatglm"
        num_layers, hidden_size, num_attention_heads = 28, 4096, 32
        multi_query_attention, multi_query_group_num, kv_channels = True, 2, 128

    shape = kv_shape_from_config(ChatGLMConfig())
    assert shape.kv_size == 28 * 128 * 2 * 2 == 14336


def test_layout_matches_official_view_permute_split():
    shape = KVShape(num_layers=3, num_kv_heads=2, head_dim=4, hidden_size=16)
    encoder = PrefixEncoder(PrefixConfig(pre_seq_len=5, prefix_dropout=0.0), shape)
    batch = 2
    # THUDM's get_prompt: (B, P, kv) -> view(B, P, 2L, G, D) -> permute([2,1,0,3,4]) -> split(2); sequence-first.
    table = encoder.embedding(torch.arange(5).unsqueeze(0).expand(batch, -1))
    official = table.view(batch, 5, 6, 2, 4).permute([2, 1, 0, 3, 4]).split(2)
    ours = encoder(batch)
    for (key, value), official_kv in zip(ours, official):
        assert torch.equal(key, official_kv[0].permute(1, 2, 0, 3))  # (P,B,G,D) -> (B,G,P,D)
        assert torch.equal(value, official_kv[1].permute(1, 2, 0, 3))


def test_projection_is_embedding_linear_tanh_linear():
    shape = KVShape(2, 2, 4, 24)
    encoder = PrefixEncoder(PrefixConfig(pre_seq_len=3, prefix_projection=True), shape)
    assert encoder.embedding.weight.shape == (3, shape.kv_size)
    assert [type(m).__name__ for m in encoder.trans] == ["Linear", "Tanh", "Linear"]
    assert encoder.trans[0].out_features == 24  # defaults to the model's hidden size
    wide = PrefixEncoder(PrefixConfig(pre_seq_len=3, prefix_projection=True, prefix_hidden_size=7), shape)
    assert wide.trans[0].out_features == 7


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="pre_seq_len"):
        PrefixConfig(pre_seq_len=0)
    with pytest.raises(ValueError, match="position_convention"):
        PrefixConfig(position_convention="left")
    with pytest.raises(ValueError, match="prefix_dropout"):
        PrefixConfig(prefix_dropout=1.5)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("projection", [False, True])
def test_gradients_reach_only_the_encoder(kind, projection):
    model = prefixed(kind, projection)
    model.train()
    ids = random_ids(2, 7)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(n.startswith("prefix_encoder.") for n in trainable)
    assert ("prefix_encoder.trans.0.weight" in trainable) == projection
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)


@pytest.mark.parametrize("kind", ["glm", "qwen2"])
@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_matches_plain(kind, projection):
    ids = random_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    results = []
    for checkpointing in (False, True):
        model = prefixed(kind, projection)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=0), name


def test_reentrant_checkpointing_is_refused():
    model = prefixed()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids=random_ids(1, 4))


def test_prefix_dropout_only_in_training():
    model = tiny_model()
    attach_prefix(model, PrefixConfig(pre_seq_len=P, prefix_dropout=0.5))
    ids = random_ids(1, 5)
    model.eval()
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    assert not torch.allclose(first, model(input_ids=ids).logits)


def test_bf16_backbone_fp32_encoder():
    model = prefixed("glm", dtype=torch.bfloat16)
    assert model.tuning.encoder.embedding.weight.dtype == torch.float32
    key, _ = model.tuning.encoder(1, dtype=torch.bfloat16)[0]
    assert key.dtype == torch.bfloat16
    model.train()
    ids = random_ids(2, 6)
    loss = model(input_ids=ids, labels=ids).loss
    assert loss.dtype == torch.bfloat16 or loss.dtype == torch.float32
    loss.backward()
    assert model.tuning.encoder.embedding.weight.grad.dtype == torch.float32
    model.eval()
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)


# ---------------------------------------------------------------- positions and masks


@pytest.mark.parametrize("kind", KINDS)
def test_chatglm_positions_start_at_zero(kind):
    """Same logits as feeding the prefix by hand with positions 0..n-1 and an extended mask."""
    model = prefixed(kind)
    ids = random_ids(2, 6)
    pairs = model.tuning.encoder(2)
    cache = DynamicCache(ddp_cache_data=[(k.detach(), v.detach()) for k, v in pairs])
    mask = torch.ones(2, P + 6, dtype=torch.long)
    positions = torch.arange(6).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        handle = model._forward_pre_hooks.copy()
        model._forward_pre_hooks.clear()  # bypass our hook: the plain model, given everything explicitly
        try:
            expected = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_argument(model): cache}
            ).logits
        finally:
            model._forward_pre_hooks.update(handle)
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    assert torch.allclose(logits(model, ids, torch.ones_like(ids)), expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_does_not_change_real_tokens(kind):
    model = prefixed(kind)
    short, long = random_ids(1, 4, seed=3)[0], random_ids(1, 7, seed=4)[0]
    ids, mask = left_pad([short, long])
    batched = logits(model, ids, mask)
    assert torch.allclose(batched[0, 3:], logits(model, short[None])[0], atol=1e-5)
    assert torch.allclose(batched[1], logits(model, long[None])[0], atol=1e-5)


def test_peft_convention_shifts_positions_by_pre_seq_len():
    chatglm = prefixed("glm")
    peft_style = prefixed("glm", position_convention="peft")
    ids = random_ids(1, 5)
    assert not torch.allclose(logits(chatglm, ids), logits(peft_style, ids), atol=1e-4)


def test_mask_lengths():
    model = prefixed()
    ids = random_ids(2, 5)
    extended = torch.ones(2, P + 5, dtype=torch.long)
    assert torch.allclose(logits(model, ids, extended), logits(model, ids), atol=1e-6)
    with pytest.raises(ValueError, match="attention_mask has length 7"):
        logits(model, ids, torch.ones(2, 7, dtype=torch.long))


def test_positional_arguments_and_foreign_cache():
    model = prefixed()
    ids = random_ids(1, 5)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, logits(model, ids))
        plain = DynamicCache(ddp_cache_data=[(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))] * 2)
        with pytest.raises(ValueError, match="not computed with this prefix"):
            model(input_ids=ids, **{cache_argument(model): plain})


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_manual_continuation_from_returned_cache(name):
    """Either keyword works on either transformers API (5.24's ``cache``, the older ``past_key_values``)."""
    model = prefixed()
    ids = random_ids(1, 6)
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], use_cache=True)
        second = model(input_ids=ids[:, 4:], use_cache=True, **{name: output_cache(first)})
    assert torch.allclose(second.logits, logits(model, ids)[:, 4:], atol=1e-5)


def test_both_cache_keywords_at_once_are_refused():
    model = prefixed()
    ids = random_ids(1, 6)
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids[:, :4], use_cache=True))
        with pytest.raises(ValueError, match="not both"):
            model(input_ids=ids[:, 4:], cache=cache, past_key_values=cache)


class _DeprecationLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower():
            self.messages.append(record.getMessage())


@pytest.mark.parametrize("kind", KINDS)
def test_our_calls_raise_no_deprecation_warning(kind):
    """Forward, continuation, training and every generate mode go through the model's own cache keyword."""
    model = prefixed(kind)
    ids = random_ids(2, 5)
    log = _DeprecationLog()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(log)
    try:
        with warnings.catch_warnings():
            # A FutureWarning / DeprecationWarning from transformers fails the test.
            warnings.simplefilter("error")
            with torch.no_grad():
                first = model(input_ids=ids, use_cache=True)
                model(input_ids=ids[:, -1:], use_cache=True, **{cache_argument(model): output_cache(first)})
                common = dict(max_new_tokens=3, pad_token_id=PAD)
                model.generate(input_ids=ids, do_sample=False, **common)
                model.generate(input_ids=ids, do_sample=False, num_beams=2, **common)
                model.generate(input_ids=ids, do_sample=True, top_p=0.7, **common)
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            model.activation_checkpointing_enable()
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        transformers_logger.removeHandler(log)
    assert log.messages == []


# ---------------------------------------------------------------- generation


def greedy_reference(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full recomputation, no cache: what generate must reproduce."""
    seq = ids
    for _ in range(steps):
        next_token = logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
    return seq


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_matches_recomputation(kind):
    model = prefixed(kind)
    ids = random_ids(2, 5)
    out = model.generate(
        input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD
    )
    assert torch.equal(out, greedy_reference(model, ids, 6))


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_generates_like_one_by_one(kind):
    model = prefixed(kind)
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 8, 5, 1)]
    ids, mask = left_pad(prompts)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
    for row, prompt in enumerate(prompts):
        single = model.generate(input_ids=prompt[None], **kwargs)[0, len(prompt) :]
        assert torch.equal(batched[row], single), row


def sequence_logprob(model, prompt: torch.Tensor, generated: torch.Tensor) -> float:
    full = torch.cat([prompt, generated])[None]
    log_probs = F.log_softmax(logits(model, full)[0, len(prompt) - 1 : -1].float(), dim=-1)
    return log_probs.gather(1, generated[:, None]).sum().item()


@pytest.mark.parametrize("kind", ["glm", "llama_mqa"])
def test_beam_search_scores_match_recomputed_logprobs(kind):
    model = prefixed(kind)
    prompt = random_ids(1, 5)
    out = model.generate(
        input_ids=prompt,
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=4,
        do_sample=False,
        early_stopping=True,
        eos_token_id=None,
        pad_token_id=PAD,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (3, 9)
    for row in range(3):
        expected = sequence_logprob(model, prompt[0], out.sequences[row, 5:])
        assert abs(out.sequences_scores[row].item() - expected) < 1e-4


@pytest.mark.parametrize("kind", ["glm", "qwen2"])
def test_sampling_with_several_return_sequences(kind):
    model = prefixed(kind)
    prompts = [random_ids(1, n, seed=n)[0] for n in (4, 6)]
    ids, mask = left_pad(prompts)
    sample = dict(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_p=0.7,
        temperature=0.95,
        num_return_sequences=3,
        max_new_tokens=5,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    out = model.generate(**sample, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (6, ids.shape[1] + 5)
    # Every step's logits are what a full recomputation of that exact sequence gives.
    for row in range(6):
        prompt = prompts[row // 3]
        generated = out.sequences[row, ids.shape[1] :]
        full = torch.cat([prompt, generated])[None]
        recomputed = logits(model, full)[0, len(prompt) - 1 : -1]
        step_logits = torch.stack([step[row] for step in out.logits])
        assert torch.allclose(step_logits, recomputed, atol=1e-4)
    torch.manual_seed(0)
    again = model.generate(**sample)
    assert torch.equal(again, out.sequences)


def test_generate_stops_at_eos_and_pads():
    model = prefixed()
    ids = random_ids(2, 4)
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert out.shape[0] == 2 and out.shape[1] <= 12


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("projection", [False, True])
def test_save_load_is_bit_exact(tmp_path, kind, projection):
    model = prefixed(kind, projection)
    model.tuning.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "prefix_config.json",
        "prefix_model.safetensors",
    ]
    meta = json.loads((tmp_path / "ckpt" / "prefix_config.json").read_text())
    assert meta["pre_seq_len"] == P and meta["prefix_projection"] == projection
    assert meta["kv_shape"]["kv_size"] == kv_shape_from_config(model.config).kv_size
    fresh = load_prefix(tiny_model(kind), tmp_path / "ckpt")
    for name, tensor in model.tuning.encoder.state_dict().items():
        assert torch.equal(tensor, fresh.tuning.encoder.state_dict()[name])
    ids = random_ids(2, 6)
    assert torch.equal(logits(model, ids), logits(fresh, ids))


def test_checkpoint_holds_only_the_prefix(tmp_path):
    model = prefixed("glm", projection=True)
    model.tuning.save(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "prefix_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.tuning.encoder.parameters())


def test_load_model_with_checkpoint(tmp_path):
    base = tiny_model("glm")
    base.save_pretrained(tmp_path / "base")
    model = prefixed("glm", projection=True)
    model.tuning.save(tmp_path / "prefix")
    loaded = load_model(str(tmp_path / "base"), ptuning_checkpoint=str(tmp_path / "prefix"))
    assert not any(
        p.requires_grad for n, p in loaded.named_parameters() if not n.startswith("prefix_encoder")
    )
    ids = random_ids(2, 5)
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-6)


def test_mismatched_checkpoint_names_every_field(tmp_path):
    trained = prefixed("glm", projection=True)
    trained.tuning.save(tmp_path)
    other = tiny_model("llama_mqa")
    with pytest.raises(ValueError) as err:
        load_prefix(other, tmp_path)
    message = str(err.value)
    assert "pre_seq_len=4, prefix_projection=True" in message
    assert "kv_size=64 (num_layers=2, num_kv_heads=2, head_dim=8)" in message
    assert "model expects kv_size=32 (num_layers=2, num_kv_heads=1, head_dim=8)" in message

    from ptuning_v2 import load_prefix_weights

    model = tiny_model("glm")
    attach_prefix(model, PrefixConfig(pre_seq_len=8, prefix_projection=False))
    with pytest.raises(ValueError) as err:
        load_prefix_weights(model, load_prefix_checkpoint(tmp_path))
    assert "pre_seq_len, prefix_projection differ" in str(err.value)
    assert "model expects pre_seq_len=8, prefix_projection=False" in str(err.value)


def test_same_kv_size_other_layout_is_refused_before_attaching(tmp_path):
    prefixed("glm").tuning.save(tmp_path)  # 2 layers x 2 kv heads x 8 dims
    other = tiny_model("llama_mqa", head_dim=16)  # 2 layers x 1 kv head x 16 dims: same kv_size 64
    assert kv_shape_from_config(other.config).kv_size == 64
    with pytest.raises(ValueError, match="num_kv_heads=1, head_dim=16"):
        load_prefix(other, tmp_path)
    assert not hasattr(other, "prefix_encoder")
    assert all(p.requires_grad for p in other.parameters())


def test_missing_or_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prefix_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a prefix checkpoint"):
        load_prefix_checkpoint(tmp_path / "empty")


def _official_state(model, with_prefix_key="transformer.prefix_encoder."):
    return {with_prefix_key + k: v.clone() for k, v in model.tuning.encoder.state_dict().items()}


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("file_format", ["bin", "safetensors", "bin-no-config"])
def test_official_chatglm_checkpoint_round_trip(tmp_path, projection, file_format):
    model = prefixed("glm", projection)
    state = _official_state(model)
    if file_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, tmp_path / "model.safetensors")
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    if file_format != "bin-no-config":
        config = {"model_type": "chatglm", "pre_seq_len": P, "prefix_projection": projection}
        (tmp_path / "config.json").write_text(json.dumps(config))
    checkpoint = load_prefix_checkpoint(tmp_path)
    assert checkpoint.source == "chatglm"
    assert checkpoint.config.pre_seq_len == P and checkpoint.config.prefix_projection == projection
    assert checkpoint.config.prefix_dropout == 0.1  # the official value
    loaded = load_prefix(tiny_model("glm"), tmp_path)
    ids = random_ids(2, 5)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_official_checkpoint_config_contradicting_weights(tmp_path):
    model = prefixed("glm", projection=False)
    torch.save(_official_state(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"pre_seq_len": 128, "prefix_projection": False}))
    with pytest.raises(
        ValueError, match="pre_seq_len=128 but transformer.prefix_encoder.embedding.weight has 4 rows"
    ):
        load_prefix_checkpoint(tmp_path)


@pytest.mark.parametrize("kind", ["glm", "qwen2"])
def test_peft_layout_round_trip(tmp_path, kind):
    model = prefixed(kind, projection=True, position_convention="peft")
    export_peft_adapter(model, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    checkpoint = load_prefix_checkpoint(tmp_path)
    assert checkpoint.source == "peft" and checkpoint.config.position_convention == "peft"
    loaded = load_prefix(tiny_model(kind), tmp_path)
    ids = random_ids(2, 5)
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-6)


@pytest.mark.parametrize("kind", ["glm", "glm4", "qwen2", "llama_mqa"])
def test_same_logits_as_peft_prefix_tuning(tmp_path, kind):
    """With PEFT's position convention and the same table, PEFT and we agree: only positions differ."""
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    ours = prefixed(kind, position_convention="peft")
    table = ours.tuning.encoder.table().detach()
    peft_model = get_peft_model(
        tiny_model(kind), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(table)
    peft_model.eval()
    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(logits(ours, ids), expected, atol=1e-5)
    # and an adapter we export loads in PEFT itself with the same outputs
    export_peft_adapter(ours, tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model(kind), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)


def test_peft_trained_prefix_reproduces_in_ours(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_model("glm"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    with torch.no_grad():
        torch.nn.init.normal_(peft_model.prompt_encoder["default"].embedding.weight, std=0.5)
    peft_model.save_pretrained(tmp_path)
    ids = random_ids(1, 6)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    ours = load_prefix(tiny_model("glm"), tmp_path)
    assert torch.allclose(logits(ours, ids), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["glm", "llama_mqa"])
def test_bake_gives_identical_logits_and_a_smaller_file(tmp_path, kind):
    model = prefixed(kind, projection=True)
    ids = random_ids(2, 6)
    before = logits(model, ids)
    model.tuning.save(tmp_path / "mlp")
    bake_prefix(model)
    assert not hasattr(model.tuning.encoder, "trans")
    assert torch.equal(logits(model, ids), before)
    model.tuning.save(tmp_path / "baked")
    size = lambda d: (tmp_path / d / "prefix_model.safetensors").stat().st_size  # noqa: E731
    assert size("baked") < size("mlp")
    reloaded = load_prefix(tiny_model(kind), tmp_path / "baked")
    assert torch.equal(logits(reloaded, ids), before)
    assert (
        json.loads((tmp_path / "baked" / "prefix_config.json").read_text())["baked_from_projection"] is True
    )


# ---------------------------------------------------------------- NLU heads


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_classification_models_train_prefix_and_head(tmp_path, task):
    model = tiny_classifier(task)
    attach_prefix(model, PrefixConfig(pre_seq_len=P, prefix_dropout=0.0))
    ids, mask = left_pad([random_ids(1, 5)[0], random_ids(1, 3, seed=7)[0]])
    labels = torch.tensor([1, 2]) if task == "sequence" else torch.randint(0, 3, ids.shape)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_encoder", "score"}
    model.eval()
    model.tuning.save(tmp_path)
    fresh = tiny_classifier(task)
    torch.nn.init.normal_(fresh.score.weight)  # the head must come from the checkpoint
    reloaded = load_prefix(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(
            reloaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
        )
