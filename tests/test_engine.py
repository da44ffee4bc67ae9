"""The multi-prefix engine: mixed batches equal single runs, the single-prefix generate path, streaming, sampling,
stop strings, cancellation and bad input."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serving_fixtures import TEXTS, build_serving_fixture, user

from ptuning_v2 import load_model, load_tokenizer
from ptuning_v2.generation import GenerationSettings, generate_kwargs
from ptuning_v2.serving import Engine, SamplingParams, default_prefixes, parse_prefixes
from ptuning_v2.serving.sampling import safe_end

GREEDY = SamplingParams(max_new_tokens=16)
PREFIXES = (None, "long", "short", "peft")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_serving_fixture(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def engine(paths):
    # A long batch window, so that requests submitted together are certain to share a batch.
    engine = Engine.load(
        str(paths["model"]),
        {name: str(paths[name]) for name in ("long", "short", "peft")},
        max_batch_size=32,
        batch_wait_ms=300,
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def singles(engine):
    """Every prompt with every prefix (and none), each run alone."""
    return {
        (text, prefix): engine.complete(user(text), prefix, GREEDY) for text in TEXTS for prefix in PREFIXES
    }


def test_loads_backbone_and_prefixes_of_every_format(engine):
    assert engine.model_name == "glm-tiny"
    assert engine.prefix_names == ["long", "short", "peft"]
    assert engine.context_length == 256
    sources = {name: table.source for name, table in engine.prefixes.items()}
    assert sources == {"long": "ptuning_v2", "short": "chatglm", "peft": "peft"}
    assert [engine.prefixes[n].length for n in engine.prefix_names] == [6, 3, 4]


def test_mixed_batch_equals_each_request_alone(engine, singles):
    before = dict(engine.stats)
    # all 24 at once: two prefix lengths, PEFT positions and the bare backbone in one batch
    prompts = {key: engine.prompt_ids(user(key[0])) for key in singles}  # tokenized first: submitted at once
    jobs = {key: engine.submit(prompts[key], key[1], GREEDY) for key in singles}
    for key, generation in jobs.items():
        text = "".join(generation)
        assert generation.token_ids == singles[key].token_ids, key
        assert text == singles[key].text
    assert engine.stats["prefills"] == before["prefills"] + 1  # one batch, not 24
    assert engine.stats["max_rows"] == len(singles)
    assert len({s.text for s in singles.values()}) > len(TEXTS) * 3  # the prefixes do change the answers


def test_requests_joining_a_running_batch_equal_single_runs(engine, singles):
    first = engine.submit(engine.prompt_ids(user(TEXTS[2])), "long", GREEDY)
    next(iter(first))  # decoding has started
    later = {key: engine.submit(engine.prompt_ids(user(key[0])), key[1], GREEDY) for key in list(singles)[:8]}
    assert "".join(first) and first.token_ids == singles[TEXTS[2], "long"].token_ids
    for key, generation in later.items():
        "".join(generation)
        assert generation.token_ids == singles[key].token_ids, key


@pytest.mark.parametrize("prefix", ["long", "short", "peft"])
def test_same_tokens_as_load_model_and_generate(paths, engine, singles, prefix):
    tokenizer = load_tokenizer(str(paths["model"]))
    model = load_model(str(paths["model"]), str(paths[prefix]))
    kwargs = generate_kwargs(GenerationSettings(max_new_tokens=GREEDY.max_new_tokens), tokenizer)
    for text in TEXTS:
        ids = torch.tensor([engine.prompt_ids(user(text))])
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[
            0, ids.shape[1] :
        ]
        expected = [t for t in output.tolist() if t not in kwargs["eos_token_id"]]
        assert singles[text, prefix].token_ids == expected, text
        assert singles[text, prefix].text == tokenizer.decode(output, skip_special_tokens=True).strip()


def test_stream_deltas_add_up_to_the_completion(engine, singles):
    for prefix in PREFIXES:
        deltas = list(engine.stream(user(TEXTS[0]), prefix, GREEDY))
        assert len(deltas) > 1 and "".join(deltas) == singles[TEXTS[0], prefix].text


def test_the_context_caps_the_reply(engine):
    # a long prompt leaves 2 tokens of the 256-token context: the reply stops there, whatever was asked
    prompt = engine.prompt_ids(user("好" * 254))[:254]
    generation = engine.submit(prompt, None, SamplingParams(max_new_tokens=50))
    "".join(generation)
    assert generation.completion_tokens <= 2


def test_usage_and_length(engine):
    result = engine.complete(user(TEXTS[1]), "short", SamplingParams(max_new_tokens=5))
    if result.finish_reason == "length":
        assert result.completion_tokens == 5
    assert result.prompt_tokens == len(engine.prompt_ids(user(TEXTS[1])))


def test_stop_strings_cut_the_answer(engine, singles):
    full = max(singles.values(), key=lambda c: len(c.text))
    key = next(k for k, v in singles.items() if v is full)
    stop = full.text[4:6]
    cut = engine.complete(user(key[0]), key[1], SamplingParams(max_new_tokens=16, stop=[stop, "never"]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)].rstrip()
    streamed = "".join(engine.stream(user(key[0]), key[1], SamplingParams(max_new_tokens=16, stop=[stop])))
    assert streamed == cut.text


def test_sampling_follows_the_seed_whatever_shares_the_batch(engine):
    sample = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9, seed=7)
    alone = engine.complete(user(TEXTS[0]), "long", sample)
    crowd = [
        engine.submit(engine.prompt_ids(user(t)), "short", SamplingParams(do_sample=True)) for t in TEXTS
    ]
    again = engine.submit(engine.prompt_ids(user(TEXTS[0])), "long", sample)
    assert "".join(again) == alone.text and again.token_ids == alone.token_ids
    for generation in crowd:
        "".join(generation)
    other = engine.complete(user(TEXTS[0]), "long", SamplingParams(**{**sample.__dict__, "seed": 8}))
    assert other.token_ids != alone.token_ids


def test_cancel_frees_the_slot_at_once(engine):
    cancel = threading.Event()
    generation = engine.stream(user(TEXTS[0]), None, SamplingParams(max_new_tokens=200), cancel=cancel)
    next(iter(generation), None)
    cancel.set()
    start = time.monotonic()
    list(generation)
    assert generation.finish_reason == "cancelled"
    assert generation.completion_tokens < 200 and time.monotonic() - start < 5
    # the engine goes on serving
    assert engine.complete(user(TEXTS[1]), None, SamplingParams(max_new_tokens=2)).finish_reason


def test_bad_requests_raise_value_errors(engine):
    with pytest.raises(ValueError, match=r"messages\[0\].role is 'wizard'"):
        engine.prompt_ids([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content must be a string"):
        engine.prompt_ids([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="non-empty list"):
        engine.prompt_ids([])
    with pytest.raises(ValueError, match="unknown prefix 'nope'"):
        engine.stream(user("hi"), "nope", GREEDY)
    with pytest.raises(ValueError, match="at least 1"):
        engine.stream(user("hi"), None, SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="the prompt has"):
        engine.stream(user("北京" * 200), None, SamplingParams(max_new_tokens=1))
    assert engine.complete(user("好"), None, SamplingParams(max_new_tokens=1)).completion_tokens <= 1


def test_checkpoint_for_another_backbone_fails_at_load(paths, tmp_path):
    from tiny_models import save_tiny_backbone

    other = save_tiny_backbone(tmp_path / "deeper", TEXTS, num_hidden_layers=3)
    with pytest.raises(ValueError, match="prefix 'long'.*does not fit this model"):
        Engine.load(str(other), {"long": str(paths["long"])})


def test_held_back_text():
    assert safe_end("北京\ufffd", []) == 2  # half a character
    assert safe_end("北京 \n", []) == 2  # trailing whitespace may end the answer
    assert safe_end("北京<|", ["<|end|>"]) == 2  # may be the start of a stop string
    assert safe_end("北京<", ["<|end|>", "x"]) == 2
    assert safe_end("北京", ["<|end|>"]) == 2


def test_streams_whole_characters_on_the_embedded_model():
    engine = Engine.load("models/glm-zh-tiny", {}, batch_wait_ms=0)
    try:
        messages = user("找出句中的人名、地名和机构名：李鹏在北京会见了新华社记者。")
        deltas = list(engine.stream(messages, None, SamplingParams(max_new_tokens=24)))
        assert deltas and not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == engine.complete(messages, None, SamplingParams(max_new_tokens=24)).text
    finally:
        engine.close()


def test_parse_prefixes():
    assert parse_prefixes("") == {} and parse_prefixes(None) == {}
    assert parse_prefixes("ner=output/a, sent=output/b") == {"ner": "output/a", "sent": "output/b"}
    for spec, message in [
        ("output/a", "has no name"),
        ("=output/a", "has no name"),
        ("ner=", "has no path"),
        ("ner=a,ner=b", "names 'ner' twice"),
        ("ner=a,,b=c", "empty entry"),
        ("n e=a", "must start with a letter"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_prefixes(spec)


def test_default_prefixes_is_the_main_jobs_prefix_when_saved(tmp_path):
    assert default_prefixes(tmp_path) == {}
    job = tmp_path / "output" / "ner-ptuning_v2-64-1e-1"
    job.mkdir(parents=True)
    (job / "prefix_config.json").write_text("{}")
    assert default_prefixes(tmp_path) == {"ner": str(job)}
