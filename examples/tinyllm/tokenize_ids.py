#!/usr/bin/env python3
"""Tokenize text with a user's own Hugging Face tokenizer into a token-id file for kvc-eval.

    build/venv/bin/python examples/tinyllm/tokenize_ids.py MODEL_DIR input.txt out.ids
The output is whitespace-separated decimal token ids (what `kvc-eval --tokens` and the C++
loop read for models whose vocabulary is not bytes). The shipped byte-level model needs no
tokenizer: its token ids are the UTF-8 bytes.
"""

import argparse
from pathlib import Path

from transformers import AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("input")
    ap.add_argument("out")
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(Path(args.input).read_text())["input_ids"]
    Path(args.out).write_text(" ".join(map(str, ids)) + "\n")
    print(f"{len(ids)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
