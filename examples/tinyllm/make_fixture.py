#!/usr/bin/env python3
"""Reference logits from transformers' LlamaForCausalLM, for the C++ loop's CI check.

    build/venv/bin/python examples/tinyllm/make_fixture.py MODEL_DIR OUT.json
writes the fixed prompt's token ids, the float32 logits of every position (eager attention,
float32 weights) and a greedy continuation. tests/tinyllm checks kvc's loop against it to
1e-3 without Python.

    build/venv/bin/python examples/tinyllm/make_fixture.py --random DIR OUT.json
first writes a randomly initialised Llama of another size (tied embeddings, bf16 weights,
hidden 96, 3 layers, 6 query heads over 3 kv heads, head_dim 16, rope_theta 500000) to
DIR, so the loader is also checked on a second layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PROMPT = "In the beginning God created the heaven and the earth. The pass key is 40213."


def random_model(directory: Path) -> None:
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=200,
                         num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                         head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                         rope_theta=500000.0, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the init so the logits are not all ~0
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--random", action="store_true", help="first write a random model to MODEL")
    ap.add_argument("--generate", type=int, default=24)
    args = ap.parse_args()
    if args.random:
        random_model(Path(args.model))
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    ids = list(PROMPT.encode())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        generated = model.generate(torch.tensor([ids]), max_new_tokens=args.generate,
                                   do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    fixture = dict(model=Path(args.model).name, prompt=PROMPT, tokens=ids,
                   logits=[[round(v, 6) for v in row] for row in logits.tolist()],
                   greedy=generated)
    Path(args.out).write_text(json.dumps(fixture) + "\n")
    print(f"wrote {args.out}: {len(ids)} positions x {logits.shape[1]} logits, "
          f"greedy continuation {bytes(generated)!r}")


if __name__ == "__main__":
    main()
