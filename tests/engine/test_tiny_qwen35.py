"""The tiny Qwen 3.5 test GGUFs: they load, generate, tokenize and template like the real ones.

Both variants (``qwen35moe`` and dense ``qwen35``) are generated into a temporary
directory once per module; loading and generating take milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, cast

import gguf
import llama_cpp
import pytest
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from tests.support.tiny_qwen35 import (
    CONTROL_TOKENS,
    QWEN35_STYLE_TEMPLATE,
    USER_DEFINED_TOKENS,
    byte_to_unicode,
    tiny_qwen35_config,
    tiny_qwen35_vocab,
    write_tiny_qwen35,
)

VARIANTS = {"moe": True, "dense": False}
ARCH = {"moe": "qwen35moe", "dense": "qwen35"}

# Token ids by text, straight from the generator's vocabulary.
_TOKENS, _ = tiny_qwen35_vocab()
TOK = {text: i for i, text in enumerate(_TOKENS)}
IM_START, IM_END, ENDOFTEXT = TOK["<|im_start|>"], TOK["<|im_end|>"], TOK["<|endoftext|>"]


def _byte_id(char: str) -> int:
    """Id of the byte token for a single ASCII character."""
    return TOK[byte_to_unicode()[ord(char)]]


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def gguf_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tiny GGUFs, written once for the module."""
    root = tmp_path_factory.mktemp("tiny_qwen35")
    return {
        name: write_tiny_qwen35(root / f"tiny-{ARCH[name]}.gguf", moe=moe)
        for name, moe in VARIANTS.items()
    }


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    """Which tiny model a test runs against ("moe" or "dense")."""
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def llm(gguf_paths: dict[str, Path], variant: str) -> Iterator[llama_cpp.Llama]:
    """The tiny model loaded the way the appliance loads models (one thread, small context)."""
    model = llama_cpp.Llama(
        model_path=str(gguf_paths[variant]), n_ctx=512, n_threads=1, verbose=False
    )
    yield model
    model.close()


def _raise_exception(message: str) -> NoReturn:
    """The ``raise_exception`` global that HF-style chat templates expect."""
    raise ValueError(message)


def _template(*, trim: bool = True, fromjson: bool = False) -> Template:
    """Compile the template the way chat servers do (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
    if fromjson:
        env.filters["fromjson"] = json.loads
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(QWEN35_STYLE_TEMPLATE)


def render(messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """Render ``messages`` with the default environment."""
    return _template().render(messages=messages, **kwargs)


# ---------------------------------------------------------------------------
# the files


def test_files_are_small_deterministic_ggufs(gguf_paths: dict[str, Path], tmp_path: Path) -> None:
    for name, path in gguf_paths.items():
        data = path.read_bytes()
        assert data[:4] == b"GGUF"
        assert len(data) < 1_000_000, f"{name}: {len(data)} bytes"
        # Same bytes when written again (fixed seed, fixed key/tensor order).
        again = write_tiny_qwen35(tmp_path / f"{name}.gguf", moe=VARIANTS[name])
        assert again.read_bytes() == data
    assert gguf_paths["moe"].read_bytes() != gguf_paths["dense"].read_bytes()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gguf_layout(gguf_paths: dict[str, Path], name: str) -> None:
    """Hybrid layer pattern, tied LM head and (for MoE) experts, as read back by gguf-py."""
    cfg = tiny_qwen35_config(moe=VARIANTS[name])
    reader = gguf.GGUFReader(gguf_paths[name])
    tensors = {t.name for t in reader.tensors}
    assert "output.weight" not in tensors  # tied to token_embd.weight
    full = [il for il in range(cfg.n_layer) if f"blk.{il}.attn_q.weight" in tensors]
    linear = [il for il in range(cfg.n_layer) if f"blk.{il}.ssm_conv1d.weight" in tensors]
    assert full == [1, 3]
    assert linear == [0, 2]
    has_experts = "blk.0.ffn_gate_exps.weight" in tensors
    assert has_experts == cfg.moe
    assert ("blk.0.ffn_up_shexp.weight" in tensors) == cfg.moe
    assert ("blk.0.ffn_up.weight" in tensors) != cfg.moe


# ---------------------------------------------------------------------------
# loading and generation


def test_loads_with_expected_metadata(llm: llama_cpp.Llama, variant: str) -> None:
    meta = llm.metadata
    assert meta["general.architecture"] == ARCH[variant]
    assert meta["tokenizer.chat_template"] == QWEN35_STYLE_TEMPLATE
    assert meta["tokenizer.ggml.pre"] == "qwen35"
    assert int(meta[f"{ARCH[variant]}.context_length"]) == 4096
    assert llm.n_vocab() == len(_TOKENS)
    assert llm.n_ctx() == 512
    if variant == "moe":
        assert int(meta["qwen35moe.expert_count"]) == 4
        assert int(meta["qwen35moe.expert_used_count"]) == 2


def test_greedy_generation(llm: llama_cpp.Llama) -> None:
    prompt = llm.tokenize(
        b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_bos=False, special=True
    )

    def greedy(n: int) -> list[int]:
        llm.reset()
        out: list[int] = []
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            out.append(token)
            if len(out) == n:
                break
        return out

    first = greedy(8)
    assert len(first) == 8
    assert all(0 <= t < llm.n_vocab() for t in first)
    assert greedy(8) == first  # greedy on fixed weights is reproducible

    llm.reset()
    completion = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
    choice = completion["choices"][0]  # type: ignore[index]
    assert isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("length", "stop")


# ---------------------------------------------------------------------------
# tokenizer


def test_chatml_control_tokens(llm: llama_cpp.Llama) -> None:
    text = b"<|im_start|>user\nhi<|im_end|>"
    expected = [
        IM_START,
        _byte_id("u"),
        _byte_id("s"),
        TOK["er"],  # a merge
        _byte_id("\n"),
        _byte_id("h"),
        _byte_id("i"),
        IM_END,
    ]
    # add_bos=True on purpose: the vocab says not to add one, like real Qwen.
    assert llm.tokenize(text, add_bos=True, special=True) == expected
    # Without special parsing the control markers are just bytes.
    plain = llm.tokenize(text, add_bos=False, special=False)
    assert IM_START not in plain
    assert IM_END not in plain
    assert llm.detokenize(plain) == text


def test_special_token_ids(llm: llama_cpp.Llama) -> None:
    assert llm.token_eos() == IM_END
    assert llm.token_bos() == ENDOFTEXT
    vocab = llm._model.vocab
    assert llama_cpp.llama_vocab_eot(vocab) == IM_END
    assert llama_cpp.llama_vocab_is_eog(vocab, IM_END)
    assert llama_cpp.llama_vocab_is_eog(vocab, ENDOFTEXT)
    assert not llama_cpp.llama_vocab_is_eog(vocab, IM_START)
    for text in CONTROL_TOKENS:
        # Control tokens vanish from plain detokenization but survive special=True.
        assert llm.detokenize([TOK[text]], special=False) == b""
        assert llm.detokenize([TOK[text]], special=True) == text.encode()


@pytest.mark.parametrize("text", USER_DEFINED_TOKENS)
def test_user_defined_tokens_are_single_tokens(llm: llama_cpp.Llama, text: str) -> None:
    # Matched as whole tokens whether or not special parsing is on, and rendered as text.
    for special in (True, False):
        assert llm.tokenize(text.encode(), add_bos=False, special=special) == [TOK[text]]
    assert llm.detokenize([TOK[text]]) == text.encode()


def test_merges_and_round_trip(llm: llama_cpp.Llama) -> None:
    assert llm.tokenize(b" the", add_bos=False, special=False) == [TOK["Ġthe"]]
    sample = "<tool_call>\n<function=f>\n</function>\n</tool_call> héllo ☃".encode()
    tokens = llm.tokenize(sample, add_bos=False, special=True)
    assert tokens[0] == TOK["<tool_call>"]
    assert llm.detokenize(tokens) == sample


# ---------------------------------------------------------------------------
# chat template

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

TOOL_CALL_TEXT = (
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n"
    "</function>\n</tool_call>"
)


def _tool_history(arguments: dict[str, Any] | str) -> list[dict[str, Any]]:
    """A user turn, an assistant turn calling two tools, and both results."""
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should call the tools.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": {"zone": "CET"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ]


TOOL_HISTORY_TAIL = (
    "<|im_start|>user\nWeather and time in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nI should call the tools.\n</think>\n\n"
    + TOOL_CALL_TEXT
    + "\n<tool_call>\n<function=get_time>\n<parameter=zone>\nCET\n</parameter>\n"
    "</function>\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>\n"
    "<tool_response>\n12:00\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<think>\n"
)


def test_template_plain_chat() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert render(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert render(messages[1:2]) == "<|im_start|>user\nHi<|im_end|>\n"


def test_template_tools_and_tool_call_history() -> None:
    out = render(
        _tool_history({"city": "Paris", "days": 2}),
        tools=[WEATHER_TOOL],
        add_generation_prompt=True,
    )
    system, rest = out.split("<|im_end|>\n", 1)
    # The user's system message comes first, merged into the tools system turn.
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    tools_block = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == [WEATHER_TOOL]
    # The XML call format is spelled out for the model.
    assert (
        "<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n"
        "</function>\n</tool_call>"
    ) in system
    assert rest == TOOL_HISTORY_TAIL


def test_template_tool_arguments_as_json_string() -> None:
    as_dict = _tool_history({"city": "Paris", "days": 2})
    as_string = _tool_history(json.dumps({"city": "Paris", "days": 2}))
    # A renderer that provides `fromjson` gets the same XML for both forms ...
    with_filter = _template(fromjson=True)
    assert with_filter.render(messages=as_string) == with_filter.render(messages=as_dict)
    assert TOOL_CALL_TEXT in with_filter.render(messages=as_string)
    # ... without it the JSON text is kept verbatim inside the function block.
    raw = render(as_string)
    assert '<function=get_weather>\n{"city": "Paris", "days": 2}\n</function>' in raw


def test_template_reasoning_replay() -> None:
    messages = [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "One.", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "Two.", "reasoning_content": "  new thoughts\n"},
    ]
    assert render(messages) == (
        "<|im_start|>user\nFirst?<|im_end|>\n"
        # Reasoning from before the last user query is dropped ...
        "<|im_start|>assistant\nOne.<|im_end|>\n"
        "<|im_start|>user\nSecond?<|im_end|>\n"
        # ... and replayed after it.
        "<|im_start|>assistant\n<think>\nnew thoughts\n</think>\n\nTwo.<|im_end|>\n"
    )
    # Reasoning inlined in the content is split out the same way.
    inline = [
        *messages[:3],
        {"role": "assistant", "content": "<think>\nnew thoughts\n</think>\n\nTwo."},
    ]
    assert render(inline) == render(messages)


def test_template_enable_thinking_false() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    prefix = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(messages, add_generation_prompt=True, enable_thinking=False) == (
        prefix + "<think>\n\n</think>\n\n"
    )
    assert (
        render(messages, add_generation_prompt=True, enable_thinking=True) == prefix + "<think>\n"
    )
    assert render(messages, add_generation_prompt=True) == prefix + "<think>\n"


def test_template_text_part_lists() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look "},
                {"type": "image_url", "image_url": {"url": "data:,"}},
                {"type": "text", "text": "here."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Seen."}]},
    ]
    assert render(messages) == (
        "<|im_start|>system\nSys.<|im_end|>\n"
        "<|im_start|>user\nLook here.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nSeen.<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Only a system prompt."}],
        [{"role": "assistant", "content": "Hello?"}],
        # Tool results wrapped in a user turn are not a query.
        [{"role": "user", "content": "<tool_response>\nok\n</tool_response>"}],
    ],
)
def test_template_requires_a_user_query(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match=r"^No user query found in messages\.$"):
        render(messages, add_generation_prompt=True)


def test_template_whitespace_does_not_depend_on_trim_options() -> None:
    messages = _tool_history({"city": "Paris", "days": 2})
    kwargs: dict[str, Any] = {"tools": [WEATHER_TOOL], "add_generation_prompt": True}
    assert _template(trim=False).render(messages=messages, **kwargs) == render(messages, **kwargs)


def test_template_from_gguf_renders_in_llama_cpp_formatter(llm: llama_cpp.Llama) -> None:
    """The embedded template also works in llama-cpp-python's own chat formatter."""
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
    )
    # llama-cpp-python types messages as TypedDicts; plain dicts are what it gets at runtime.
    messages = cast(Any, _tool_history({"city": "Paris", "days": 2}))
    prompt = formatter(messages=messages, tools=cast(Any, [WEATHER_TOOL])).prompt
    assert prompt.endswith(TOOL_HISTORY_TAIL)
    no_think = formatter(messages=messages[:2], enable_thinking=False).prompt
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match="No user query found"):
        formatter(messages=messages[:1])


# ---------------------------------------------------------------------------
# grammar-constrained generation

FORCED = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "</function>\n</tool_call>"
)


def _gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def test_grammar_forces_tool_call(llm: llama_cpp.Llama) -> None:
    grammar = LlamaGrammar.from_string("root ::= " + _gbnf_literal(FORCED), verbose=False)
    # No tools section in the prompt: with a byte-level vocab it alone is ~700 tokens,
    # more than the 512-token context.
    prompt = render(
        [{"role": "user", "content": "Weather in Paris?"}],
        add_generation_prompt=True,
        enable_thinking=False,
    )
    llm.reset()
    out = llm.create_completion(prompt, grammar=grammar, max_tokens=256, temperature=0.0)
    choice = out["choices"][0]  # type: ignore[index]
    assert choice["text"] == FORCED
    # Once the grammar is complete only an end-of-generation token is allowed.
    assert choice["finish_reason"] == "stop"


def test_gbnf_literal_escaping() -> None:
    assert _gbnf_literal('a"b\\c\n') == '"a\\"b\\\\c\\n"'
