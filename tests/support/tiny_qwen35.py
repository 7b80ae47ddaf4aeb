"""Tiny random-weight GGUF models of the Qwen 3.5 architectures, for tests.

``write_tiny_qwen35`` writes a few-hundred-KB GGUF of either ``qwen35moe`` (hybrid
gated-delta-net / full attention layers with a routed + shared expert FFN) or the
dense ``qwen35`` variant. The weights are random (fixed seed, so the file's bytes
are stable across runs), which makes the text they generate meaningless; what the
files are good for is exercising the real loading, tokenization, chat-template and
sampling code paths of llama.cpp with the same metadata layout as the real models.

The tokenizer is a synthetic byte-level BPE vocabulary: the 256 GPT-2 byte tokens,
a few merges, and the Qwen special tokens (ChatML control tokens plus the
``<think>`` / ``<tool_call>`` / ``<tool_response>`` markers as plain-text
user-defined tokens), with ``QWEN35_STYLE_TEMPLATE`` embedded as the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from gguf import GGUFWriter, TokenType

__all__ = [
    "CONTROL_TOKENS",
    "MERGES",
    "QWEN35_STYLE_TEMPLATE",
    "USER_DEFINED_TOKENS",
    "TinyQwen35Config",
    "byte_to_unicode",
    "tiny_qwen35_config",
    "tiny_qwen35_vocab",
    "write_tiny_qwen35",
]

_TEMPLATE_PATH: Final = Path(__file__).with_name("qwen35_template.jinja")

#: The chat template embedded as ``tokenizer.chat_template`` (our own text, written
#: to produce the Qwen 3.5 prompt format; see ``qwen35_template.jinja``).
QWEN35_STYLE_TEMPLATE: Final[str] = _TEMPLATE_PATH.read_text(encoding="utf-8")

#: Special tokens that only appear when special-token parsing is on and render to
#: nothing when detokenized without ``special`` (CONTROL in GGUF terms).
CONTROL_TOKENS: Final[tuple[str, ...]] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: Added tokens that are always matched as whole tokens and render as their text
#: (USER_DEFINED in GGUF terms), like the non-special added tokens of real Qwen.
USER_DEFINED_TOKENS: Final[tuple[str, ...]] = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)

#: A handful of BPE merges over the GPT-2 byte alphabet ("Ġ" is the space byte), so
#: the merge code path runs too; each merge's result is also added as a token.
MERGES: Final[tuple[tuple[str, str], ...]] = (
    ("h", "e"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("o", "n"),
)

_SEED: Final = 20_350  # fixed so that the written bytes never change between runs
_GGML_FILE_TYPE_MOSTLY_F16: Final = 1


@dataclass(frozen=True)
class TinyQwen35Config:
    """Hyperparameters of a tiny Qwen 3.5 model (names follow the GGUF keys)."""

    arch: str
    n_embd: int = 64
    n_layer: int = 4
    # Every ``full_attention_interval``-th layer is full attention, the others are
    # linear attention (gated delta net); 2 gives two of each in four layers.
    full_attention_interval: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    # Partial rotary embedding as in the real models (a quarter there, half here):
    # the interleaved M-RoPE sections must add up to rope_dim / 2.
    rope_dim: int = 8
    rope_sections: tuple[int, int, int, int] = (2, 1, 1, 0)
    rope_freq_base: float = 10_000_000.0
    rms_eps: float = 1e-6
    context_length: int = 4096
    # Gated delta net: k heads = group_count, v heads = time_step_rank, head size =
    # state_size for both, so inner_size = state_size * time_step_rank.
    ssm_conv_kernel: int = 4
    ssm_state_size: int = 16
    ssm_group_count: int = 2
    ssm_time_step_rank: int = 4
    # Dense FFN width (qwen35) / expert widths (qwen35moe).
    n_ff: int = 128
    n_expert: int = 4
    n_expert_used: int = 2
    n_ff_exp: int = 32
    n_ff_shexp: int = 32

    @property
    def moe(self) -> bool:
        """Whether this is the mixture-of-experts variant."""
        return self.arch == "qwen35moe"

    @property
    def ssm_inner_size(self) -> int:
        """Total value width of a linear-attention layer."""
        return self.ssm_state_size * self.ssm_time_step_rank

    def is_full_attention(self, layer: int) -> bool:
        """Mirror llama.cpp's rule for which layers are full (non-recurrent) attention."""
        return (layer + 1) % self.full_attention_interval == 0


def tiny_qwen35_config(*, moe: bool = True) -> TinyQwen35Config:
    """Return the hyperparameters ``write_tiny_qwen35`` uses."""
    return TinyQwen35Config(arch="qwen35moe" if moe else "qwen35")


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE.

    Printable Latin-1 bytes stand for themselves; the rest (control characters,
    space, ...) are shifted to code points from 256 upward, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def tiny_qwen35_vocab() -> tuple[list[str], list[int]]:
    """Return the token texts and GGUF token types, in id order.

    Ids 0-255 are the byte tokens (id == byte value), then the merge results, then
    the control tokens, then the user-defined tokens.
    """
    table = byte_to_unicode()
    tokens = [table[b] for b in range(256)]
    types = [int(TokenType.NORMAL)] * 256
    for left, right in MERGES:
        tokens.append(left + right)
        types.append(int(TokenType.NORMAL))
    for text in CONTROL_TOKENS:
        tokens.append(text)
        types.append(int(TokenType.CONTROL))
    for text in USER_DEFINED_TOKENS:
        tokens.append(text)
        types.append(int(TokenType.USER_DEFINED))
    return tokens, types


class _Weights:
    """Deterministic random tensors in the dtypes the real conversions use."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def matrix(self, *shape: int) -> npt.NDArray[np.float16]:
        """A weight matrix (numpy order: outermost llama.cpp dim first), stored f16.

        Scaled by 1/sqrt(fan_in) so activations keep a sane magnitude.
        """
        fan_in = shape[-1]
        values: npt.NDArray[np.float64] = self._rng.standard_normal(shape) / np.sqrt(fan_in)
        return values.astype(np.float16)

    def small_f32(self, *shape: int, scale: float = 0.1) -> npt.NDArray[np.float32]:
        """Small f32 values; for 1-D and convolution tensors, which stay f32 in GGUF."""
        return (self._rng.standard_normal(shape) * scale).astype(np.float32)

    @staticmethod
    def ones(n: int) -> npt.NDArray[np.float32]:
        """RMS-norm weights (stored already "+1"-adjusted, as the converter does)."""
        return np.ones(n, dtype=np.float32)


def _write_metadata(writer: GGUFWriter, cfg: TinyQwen35Config) -> None:
    """Hyperparameter keys, mirroring what convert_hf_to_gguf writes for Qwen 3.5."""
    a = cfg.arch
    writer.add_name(f"tiny-{a}-test")
    writer.add_file_type(_GGML_FILE_TYPE_MOSTLY_F16)
    writer.add_uint32(f"{a}.context_length", cfg.context_length)
    writer.add_uint32(f"{a}.embedding_length", cfg.n_embd)
    writer.add_uint32(f"{a}.block_count", cfg.n_layer)
    writer.add_uint32(f"{a}.attention.head_count", cfg.n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", cfg.n_head_kv)
    writer.add_uint32(f"{a}.attention.key_length", cfg.head_dim)
    writer.add_uint32(f"{a}.attention.value_length", cfg.head_dim)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    writer.add_float32(f"{a}.rope.freq_base", cfg.rope_freq_base)
    writer.add_uint32(f"{a}.rope.dimension_count", cfg.rope_dim)
    # Required by the qwen35* loaders (no default): interleaved M-RoPE sections.
    writer.add_array(f"{a}.rope.dimension_sections", list(cfg.rope_sections))
    writer.add_uint32(f"{a}.full_attention_interval", cfg.full_attention_interval)
    writer.add_uint32(f"{a}.ssm.conv_kernel", cfg.ssm_conv_kernel)
    writer.add_uint32(f"{a}.ssm.state_size", cfg.ssm_state_size)
    writer.add_uint32(f"{a}.ssm.group_count", cfg.ssm_group_count)
    writer.add_uint32(f"{a}.ssm.time_step_rank", cfg.ssm_time_step_rank)
    writer.add_uint32(f"{a}.ssm.inner_size", cfg.ssm_inner_size)
    if cfg.moe:
        writer.add_uint32(f"{a}.expert_count", cfg.n_expert)
        writer.add_uint32(f"{a}.expert_used_count", cfg.n_expert_used)
        writer.add_uint32(f"{a}.expert_feed_forward_length", cfg.n_ff_exp)
        writer.add_uint32(f"{a}.expert_shared_feed_forward_length", cfg.n_ff_shexp)
    else:
        writer.add_uint32(f"{a}.feed_forward_length", cfg.n_ff)


def _write_tokenizer(writer: GGUFWriter) -> None:
    """The synthetic byte-level BPE vocabulary, special ids and chat template."""
    tokens, types = tiny_qwen35_vocab()
    ids = {text: i for i, text in enumerate(tokens)}
    writer.add_tokenizer_model("gpt2")
    # The pre-tokenizer name the real Qwen 3.5 GGUFs carry (llama.cpp also knows it).
    writer.add_tokenizer_pre("qwen35")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in MERGES])
    # As in the real Qwen GGUFs: <|endoftext|> doubles as BOS and padding but BOS is
    # never prepended; a turn ends with <|im_end|>.
    writer.add_bos_token_id(ids["<|endoftext|>"])
    writer.add_pad_token_id(ids["<|endoftext|>"])
    writer.add_eos_token_id(ids["<|im_end|>"])
    writer.add_eot_token_id(ids["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(QWEN35_STYLE_TEMPLATE)


def _write_tensors(writer: GGUFWriter, cfg: TinyQwen35Config) -> None:
    """Random weights with the tensor names and shapes llama.cpp's loader expects.

    numpy shapes are llama.cpp's ``ne`` reversed (``{n_embd, n_vocab}`` ->
    ``(n_vocab, n_embd)``). No ``output.weight``: the LM head is tied to the token
    embedding, as in the smaller real models.
    """
    w = _Weights(_SEED if cfg.moe else _SEED + 1)
    n_vocab = len(tiny_qwen35_vocab()[0])
    e = cfg.n_embd
    writer.add_tensor("token_embd.weight", w.matrix(n_vocab, e))
    writer.add_tensor("output_norm.weight", w.ones(e))

    # Linear-attention widths (k and v heads share the state size as head size).
    key_dim = cfg.ssm_state_size * cfg.ssm_group_count
    value_dim = cfg.ssm_inner_size
    conv_dim = 2 * key_dim + value_dim
    v_heads = cfg.ssm_time_step_rank

    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        writer.add_tensor(p + "attn_norm.weight", w.ones(e))
        writer.add_tensor(p + "post_attention_norm.weight", w.ones(e))
        if cfg.is_full_attention(il):
            # The Q projection is twice as wide: query and an output gate per head.
            writer.add_tensor(p + "attn_q.weight", w.matrix(2 * cfg.n_head * cfg.head_dim, e))
            writer.add_tensor(p + "attn_k.weight", w.matrix(cfg.n_head_kv * cfg.head_dim, e))
            writer.add_tensor(p + "attn_v.weight", w.matrix(cfg.n_head_kv * cfg.head_dim, e))
            writer.add_tensor(p + "attn_output.weight", w.matrix(e, cfg.n_head * cfg.head_dim))
            writer.add_tensor(p + "attn_q_norm.weight", w.ones(cfg.head_dim))
            writer.add_tensor(p + "attn_k_norm.weight", w.ones(cfg.head_dim))
        else:
            # Optional to the loader but needed by the graph: fused q/k/v input
            # projection and the z gate.
            writer.add_tensor(p + "attn_qkv.weight", w.matrix(conv_dim, e))
            writer.add_tensor(p + "attn_gate.weight", w.matrix(value_dim, e))
            writer.add_tensor(p + "ssm_conv1d.weight", w.small_f32(conv_dim, cfg.ssm_conv_kernel))
            writer.add_tensor(p + "ssm_dt.bias", w.small_f32(v_heads))
            # The converter stores -exp(A_log); keep it negative so the state decays.
            a_log = w.small_f32(v_heads)
            writer.add_tensor(p + "ssm_a", (-np.exp(a_log)).astype(np.float32))
            writer.add_tensor(p + "ssm_beta.weight", w.matrix(v_heads, e))
            writer.add_tensor(p + "ssm_alpha.weight", w.matrix(v_heads, e))
            writer.add_tensor(p + "ssm_norm.weight", w.ones(cfg.ssm_state_size))
            writer.add_tensor(p + "ssm_out.weight", w.matrix(e, value_dim))

        if cfg.moe:
            n_x, ff_x, ff_s = cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp
            # The router stays f32 like the converter keeps it.
            writer.add_tensor(p + "ffn_gate_inp.weight", w.small_f32(n_x, e, scale=0.5))
            writer.add_tensor(p + "ffn_gate_exps.weight", w.matrix(n_x, ff_x, e))
            writer.add_tensor(p + "ffn_up_exps.weight", w.matrix(n_x, ff_x, e))
            writer.add_tensor(p + "ffn_down_exps.weight", w.matrix(n_x, e, ff_x))
            writer.add_tensor(p + "ffn_gate_inp_shexp.weight", w.small_f32(e, scale=0.5))
            writer.add_tensor(p + "ffn_gate_shexp.weight", w.matrix(ff_s, e))
            writer.add_tensor(p + "ffn_up_shexp.weight", w.matrix(ff_s, e))
            writer.add_tensor(p + "ffn_down_shexp.weight", w.matrix(e, ff_s))
        else:
            writer.add_tensor(p + "ffn_gate.weight", w.matrix(cfg.n_ff, e))
            writer.add_tensor(p + "ffn_up.weight", w.matrix(cfg.n_ff, e))
            writer.add_tensor(p + "ffn_down.weight", w.matrix(e, cfg.n_ff))


def write_tiny_qwen35(
    path: Path, *, moe: bool = True, config: TinyQwen35Config | None = None
) -> Path:
    """Write a tiny random ``qwen35moe`` (default) or dense ``qwen35`` GGUF to ``path``.

    ``config`` overrides the tiny hyperparameters (``bench/gpu/make_qwen35moe.py`` writes
    a model with the real 35B-A3B layer shapes this way). The output is byte-for-byte
    deterministic. Returns ``path``.
    """
    cfg = config or tiny_qwen35_config(moe=moe)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, cfg.arch)
    try:
        _write_metadata(writer, cfg)
        _write_tokenizer(writer)
        _write_tensors(writer, cfg)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
