"""Write a random-weight ``qwen35moe`` GGUF with the layer shapes of Qwen 3.5 35B-A3B.

The real model's weights (~20 GB at Q4) cannot travel to the GPU machine, which reaches
no registry; this file has the same per-token work on the hot path: hidden size 2048,
40 layers (every 4th full attention with 16 query / 2 KV heads of 256, the others gated
delta nets with 16 key / 32 value heads of 128), 8 routed experts of width 512 per token
plus a shared expert. Two things are smaller on purpose, and both only shrink the file:
the expert *count* (16 instead of 256; a token still runs 8 of them) and the vocabulary
(the tests' ~280-token byte-level one instead of 248k, so the LM head is negligible).

    python bench/gpu/make_qwen35moe.py OUT.gguf [--layers 40] [--experts 16]

Random weights make meaningless text; decoding speed and memory are what it is for.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.tiny_qwen35 import TinyQwen35Config, write_tiny_qwen35


def a3b_config(layers: int, experts: int) -> TinyQwen35Config:
    """Qwen 3.5 35B-A3B's hyperparameters, with ``experts`` routed experts."""
    return TinyQwen35Config(
        arch="qwen35moe",
        n_embd=2048,
        n_layer=layers,
        full_attention_interval=4,
        n_head=16,
        n_head_kv=2,
        head_dim=256,
        rope_dim=64,
        rope_sections=(11, 11, 10, 0),
        context_length=32768,
        ssm_conv_kernel=4,
        ssm_state_size=128,
        ssm_group_count=16,
        ssm_time_step_rank=32,
        n_expert=experts,
        n_expert_used=min(8, experts),
        n_ff_exp=512,
        n_ff_shexp=512,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--experts", type=int, default=16)
    args = parser.parse_args()
    started = time.monotonic()
    write_tiny_qwen35(args.out, config=a3b_config(args.layers, args.experts))
    size = args.out.stat().st_size
    print(f"{args.out}: {size / 2**30:.2f} GiB in {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
