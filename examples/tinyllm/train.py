#!/usr/bin/env python3
"""Train kvc's tiny Llama: a byte-level LlamaForCausalLM with grouped-query attention.

The model exists so every compression claim of kvc can be measured on a *trained* model
(attention sinks, heavy hitters, retrieval heads and outlier channels are properties of
trained models, not of random tensors). It learns from two sources:

  * public-domain prose: the King James Bible from Debian's `bible-kjv` packages
    (`bible gen1:1-rev22:21`), verse numbers and headings stripped, one paragraph per chapter;
    the last 4 % of chapters are held out for perplexity;
  * synthetic long-context tasks that need retrieval heads:
      - passkey retrieval: a 5-digit key stated once at a random depth inside prose filler,
        asked for at the end ("What is the pass key? The pass key is 73915.");
      - key->value lookup: many "key 4821 = value 9381." pairs, then several queries.

Loss: next-byte cross-entropy on every byte, plus the mean cross-entropy on the answer bytes
of the synthetic tasks (their 5-10 bytes would otherwise drown in the prose).

Usage (from the repository root; `examples/tinyllm/setup_venv.sh` creates build/venv):
    build/venv/bin/python examples/tinyllm/train.py --out examples/tinyllm/model --minutes 50
On a GPU pass --device cuda and a bigger --preset; on CPU the `cpu` preset is the default.
Writes config.json + model.safetensors (save_pretrained), heldout.txt (64 KiB of the held-out
chapters, for kvc-eval), train_log.jsonl and eval.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    # ~3.3 M parameters: trains in under an hour on 2 CPU cores.
    "cpu": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2),
    # ~12 M parameters: for a GPU.
    "gpu": dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=8,
                num_attention_heads=6, num_key_value_heads=2),
}
CONTEXT = 2048
HELDOUT_BYTES = 64 * 1024


# ---- data ---------------------------------------------------------------------------------

def load_kjv() -> list[str]:
    """The KJV as a list of chapters, each one paragraph of plain prose."""
    raw = subprocess.run(["bible", "gen1:1-rev22:21"], check=True, capture_output=True,
                         text=True).stdout
    chapters, verses = [], []
    for line in raw.splitlines():
        if re.fullmatch(r"\S.* \d+", line.strip()) and not line.startswith(" "):
            if verses:  # a chapter heading ("Genesis 2") closes the previous chapter
                chapters.append(" ".join(verses))
                verses = []
            continue
        line = line.strip()
        if not line:
            continue
        m = re.match(r"^\d+ (.*)$", line)
        verses.append(m.group(1) if m else line)
    if verses:
        chapters.append(" ".join(verses))
    return [re.sub(r"\s+", " ", c).strip() + "\n\n" for c in chapters]


class Corpus:
    def __init__(self, chapters: list[str], rng: random.Random):
        self.text = "".join(chapters).encode("ascii", "ignore")
        self.rng = rng

    def span(self, n: int) -> bytes:
        start = self.rng.randrange(0, len(self.text) - n)
        return self.text[start:start + n]


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def passkey_sample(corpus: Corpus, length: int, rng: random.Random, depth: float | None = None):
    """(bytes, answer_mask): a passkey stated at `depth` of the filler, asked at the end."""
    key = digits(rng, 5)
    head = b"There is a pass key hidden in this text. Remember it.\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. ".encode()
    question = b"\nWhat is the pass key? The pass key is "
    answer = f"{key}.".encode()
    filler_len = length - len(head) - len(needle) - len(question) - len(answer)
    filler = corpus.span(max(filler_len, 0))
    depth = rng.random() if depth is None else depth
    cut = int(len(filler) * depth)
    text = head + filler[:cut] + needle + filler[cut:] + question
    mask = [0] * len(text) + [1] * len(key) + [0]
    return text + answer, mask


def lookup_sample(length: int, rng: random.Random, queries: int = 4):
    """Many key->value pairs, then `queries` lookups of random earlier keys."""
    pairs, out, mask = {}, bytearray(b"A list of keys and their values.\n"), []
    reserve = queries * len("key 00000 = value 00000.\n") + 8
    while len(out) + 30 < length - reserve:
        k = digits(rng, 5)
        if k in pairs:
            continue
        pairs[k] = digits(rng, 5)
        out += f"key {k} = value {pairs[k]}.\n".encode()
    mask = [0] * len(out)
    out += b"Now the lookups.\n"
    mask += [0] * len(b"Now the lookups.\n")
    for k in rng.sample(list(pairs), min(queries, len(pairs))):
        prompt = f"key {k} = value ".encode()
        out += prompt + pairs[k].encode() + b".\n"
        mask += [0] * len(prompt) + [1] * 5 + [0, 0]
    return bytes(out), mask


def make_batch(corpus: Corpus, rng: random.Random, length: int, batch: int,
               synthetic: float = 0.5, lookup: float = 0.4):
    xs, ms = [], []
    for _ in range(batch):
        r = rng.random()
        if r >= synthetic:
            text, mask = corpus.span(length + 1), [0] * (length + 1)
        elif r < synthetic * (1.0 - lookup):
            text, mask = passkey_sample(corpus, length + 1, rng)
        else:
            text, mask = lookup_sample(length + 1, rng)
        text, mask = text[:length + 1], mask[:length + 1]
        pad = length + 1 - len(text)  # lookup samples may be a few bytes short
        xs.append(list(text) + [ord(" ")] * pad)
        ms.append(mask + [0] * pad)
    x = torch.tensor(xs, dtype=torch.long)
    m = torch.tensor(ms, dtype=torch.float32)
    return x[:, :-1], x[:, 1:], m[:, 1:]


# ---- evaluation ---------------------------------------------------------------------------

@torch.no_grad()
def heldout_ppl(model, text: bytes, device, length: int = 1024, max_windows: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(min(max_windows, (len(text) - 1) // length)):
        chunk = torch.tensor(list(text[i * length:(i + 1) * length + 1]), device=device)
        logits = model(chunk[None, :-1]).logits[0].float()
        total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += length
    model.train()
    return math.exp(total / count)


@torch.no_grad()
def passkey_accuracy(model, corpus: Corpus, device, lengths=(512, 1024, 2048),
                     depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 4, seed: int = 7):
    model.eval()
    rng = random.Random(seed)
    grid = {}
    for length in lengths:
        for depth in depths:
            hits = 0
            for _ in range(trials):
                text, mask = passkey_sample(corpus, length, rng, depth)
                answer_at = mask.index(1)
                ids = torch.tensor(list(text[:answer_at]), device=device)[None]
                out = model.generate(ids, max_new_tokens=5, do_sample=False,
                                     pad_token_id=0)[0, answer_at:].tolist()
                hits += bytes(out) == text[answer_at:answer_at + 5]
            grid[f"{length}@{depth}"] = hits / trials
    model.train()
    return sum(grid.values()) / len(grid), grid


# ---- training -----------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="examples/tinyllm/model")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-clock training budget")
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (AVX-512 BF16 / GPU)")
    ap.add_argument("--init", help="continue from this checkpoint directory (same preset)")
    ap.add_argument("--synthetic", type=float, default=0.5,
                    help="share of sequences that are passkey/lookup tasks (rest: prose)")
    ap.add_argument("--lookup", type=float, default=0.4,
                    help="share of the synthetic sequences that are key->value lookups")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    chapters = load_kjv()
    split = int(len(chapters) * 0.96)
    train_corpus = Corpus(chapters[:split], rng)
    heldout_text = "".join(chapters[split:]).encode("ascii", "ignore")
    eval_corpus = Corpus(chapters[split:], random.Random(99))

    config = LlamaConfig(vocab_size=256, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, head_dim=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         attention_bias=False, mlp_bias=False, **PRESETS[args.preset])
    if args.init:
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(args.device)
    else:
        model = LlamaForCausalLM(config).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params / 1e6:.2f} M parameters on {args.device}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # kvc-eval's perplexity text and passkey filler: held-out chapters, never trained on.
    (out / "heldout.txt").write_bytes(heldout_text[:HELDOUT_BYTES])
    log = open(out / "train_log.jsonl", "w")
    # Length curriculum: short sequences first (cheap, learn the copy mechanism), then a mix
    # that reaches the full context so RoPE positions up to 2047 are trained.
    lengths = [256, 512, 1024, 2048]
    budget_s, start, step, tokens = args.minutes * 60, time.time(), 0, 0
    warmup = 100
    while True:
        elapsed = time.time() - start
        frac = elapsed / budget_s
        if frac >= 1.0:
            break
        if frac < 0.15:
            length = 256
        elif frac < 0.4:
            length = rng.choice(lengths[:3])
        else:
            length = rng.choices(lengths, weights=[1, 2, 2, 3])[0]
        batch = max(1, args.tokens_per_step // length)
        x, y, m = (t.to(args.device) for t in make_batch(train_corpus, rng, length, batch, args.synthetic,
                                                     args.lookup))
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(args.device if args.device != "cpu" else "cpu",
                            dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x).logits.float()
        ce = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="none").view_as(m)
        lm_loss = ce.mean()
        answer_loss = (ce * m).sum() / m.sum().clamp(min=1)
        loss = lm_loss + answer_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 25 == 0:
            rec = dict(step=step, seconds=round(time.time() - start, 1), tokens=tokens,
                       length=length, lr=lr, lm_loss=round(lm_loss.item(), 4),
                       answer_loss=round(answer_loss.item(), 4))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
        if step % 500 == 0:
            model.save_pretrained(out, safe_serialization=True)

    ppl = heldout_ppl(model, heldout_text, args.device)
    acc, grid = passkey_accuracy(model, eval_corpus, args.device)
    result = dict(preset=args.preset, device=args.device, parameters=params, steps=step,
                  tokens=tokens, minutes=round((time.time() - start) / 60, 1),
                  heldout_ppl=round(ppl, 4), heldout_bits_per_byte=round(math.log2(ppl), 4),
                  passkey_accuracy=acc, passkey_grid=grid,
                  torch=torch.__version__, seed=args.seed)
    print(json.dumps(result, indent=1), flush=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
