#!/usr/bin/env python3
"""Write a tiny llama GGUF with seeded random weights: a real model file for llama.cpp, no download.

    python tools/llm/make_test_model.py OUT.gguf [--seed 7] [--size tiny|paced]

The same seed and size write the same bytes. The model knows nothing; it exists so that a real
OpenAI-compatible server (llama.cpp's: streamgate-llm-server, the llm role) streams real tokens in
tests. What llama.cpp needs of it: the `llama.*` hyperparameters, a SentencePiece-style (`llama`)
vocabulary with scores, types and bos/eos/unk, all 256 `<0xNN>` byte tokens (without them the
tokenizer throws on any character it has no token for), and a chat template.

Sizes: `tiny` (0.5 MB) decodes a token in about 0.1 ms on one core, too fast for a client to
see tokens apart; `paced` (210 MB, written in about 2 s) takes 8 to 20 ms a token on one core
of this 2-core machine (quiet to busy), the pace of a small real model, so a relay that buffers
shows in the arrival times. Decoding is compute-bound: a slower pace costs no more CPU a second.

Its answers are made of whole words only: every token embedding carries a constant on one
dimension, and the output rows of the control and byte tokens weigh that dimension strongly
negative, so they are never sampled. The server's streams therefore never end early on an
end-of-sequence token (they run to `max_tokens`) and never carry a broken UTF-8 sequence.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CONTEXT_LENGTH = 2048
HEAD_COUNT = 4
HEAD_COUNT_KV = 2
RMS_EPSILON = 1e-5
# Dimension 0 of every embedding: large enough to dominate each hidden state after the norm.
BIAS_DIMENSION_VALUE = 4.0
NEVER_SAMPLED_WEIGHT = -8.0
LAYER_WEIGHT_SCALE = 0.02

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: unk, bos, eos
WORDS = """
the of and to in is that it for on with as was at by be this from or have an are not but had
stream token word answer model server relay byte chunk event gateway edge host proxy buffer
flush read write send wait time fast slow first last next every each one two three many some
light river stone cloud green blue north south small large quiet early late open close start
end line page book note letter number place point state system test check proof value result
""".split()


@dataclass(frozen=True)
class Size:
    embedding_length: int
    block_count: int
    feed_forward_length: int


SIZES = {"tiny": Size(64, 2, 128), "paced": Size(768, 8, 2048)}
# The messages' text only: every character of a prompt is a token here (bytes), and a short
# prompt keeps the first token of a cold slot quick (prompt processing is this model's TTFT).
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types): specials, the 256 byte tokens, then words with '▁'."""
    types = gguf.TokenType
    tokens = list(SPECIAL_TOKENS)
    kinds = [types.UNKNOWN, types.CONTROL, types.CONTROL]
    tokens += [f"<0x{value:02X}>" for value in range(256)]
    kinds += [types.BYTE] * 256
    words = sorted({f"\u2581{word}" for word in WORDS} | {",", ".", "\u2581"})
    tokens += words
    kinds += [types.NORMAL] * len(words)
    # Merge priorities of the tokenizer; prompts end up as byte tokens anyway (the words' parts
    # are not in the vocabulary), which is all a model that knows nothing needs.
    scores = [-1.0 if kind == types.NORMAL else 0.0 for kind in kinds]
    return tokens, scores, [int(kind) for kind in kinds]


def tensors(
    size: Size, vocab_size: int, sampled: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Every tensor, numpy shape (out, in) as llama.cpp's converters write them, float32."""

    def random(*shape: int, scale: float = LAYER_WEIGHT_SCALE) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    width, feed_forward = size.embedding_length, size.feed_forward_length
    ones = np.ones(width, dtype=np.float32)
    embedding = random(vocab_size, width, scale=1.0)
    embedding[:, 0] = BIAS_DIMENSION_VALUE
    output = random(vocab_size, width, scale=0.6)
    output[:, 0] = np.where(sampled, 0.0, NEVER_SAMPLED_WEIGHT)
    kv_width = width // HEAD_COUNT * HEAD_COUNT_KV
    found = {"token_embd.weight": embedding, "output_norm.weight": ones, "output.weight": output}
    for block in range(size.block_count):
        prefix = f"blk.{block}."
        found |= {
            prefix + "attn_norm.weight": ones,
            prefix + "attn_q.weight": random(width, width),
            prefix + "attn_k.weight": random(kv_width, width),
            prefix + "attn_v.weight": random(kv_width, width),
            prefix + "attn_output.weight": random(width, width),
            prefix + "ffn_norm.weight": ones,
            prefix + "ffn_gate.weight": random(feed_forward, width),
            prefix + "ffn_up.weight": random(feed_forward, width),
            prefix + "ffn_down.weight": random(width, feed_forward),
        }
    return found


def write_model(path: Path, seed: int, size: Size) -> None:
    tokens, scores, types = vocabulary()
    sampled = np.array([kind == gguf.TokenType.NORMAL for kind in types])
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"streamgate-test-llama-seed{seed}")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(size.embedding_length)
    writer.add_block_count(size.block_count)
    writer.add_feed_forward_length(size.feed_forward_length)
    writer.add_head_count(HEAD_COUNT)
    writer.add_head_count_kv(HEAD_COUNT_KV)
    writer.add_layer_norm_rms_eps(RMS_EPSILON)
    writer.add_rope_dimension_count(size.embedding_length // HEAD_COUNT)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in tensors(size, len(tokens), sampled, np.random.default_rng(seed)).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path, help="the GGUF file to write")
    parser.add_argument("--seed", type=int, default=7, help="same seed, same file")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    args = parser.parse_args()
    args.path.parent.mkdir(parents=True, exist_ok=True)
    write_model(args.path, args.seed, SIZES[args.size])
    print(
        f"wrote {args.path} ({args.path.stat().st_size} bytes, seed {args.seed}, size {args.size})"
    )


if __name__ == "__main__":
    main()
