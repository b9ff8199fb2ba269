"""Build the small pretrained base the default demo fine-tunes (peftc/assets/demo_llama).

A frozen *random* base cannot show PEFT learning anything a person recognises (RESULTS.md, issue
#19): LoRA on attention cannot sharpen a random head. So peftc ships a tiny Llama (the
`model=tiny_llama` shape: hidden 64, 2 layers, byte-level vocabulary of 260) pretrained here on a
generic English corpus of everyday sentences about the same people, animals and places as the
built-in stories, but never the stories' plot ("walked to ... There it found ..."). The default
run then teaches that plot to a LoRA adapter, and its before/after continuation shows it.

    python experiments/make_demo_base.py            # writes peftc/assets/demo_llama (about 1 min)

Deterministic for a given torch version (seeded corpus, seeded init, single thread).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "peftc" / "assets"
TARGET = ASSETS / "demo_llama"
# A minimal chat template (Zephyr's layout), so data.format=chat works on the demo base as on
# instruction-tuned checkpoints: each turn ends with EOS, which the assistant turns learn to emit.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo"]
ANIMALS = ["cat", "dog", "duck", "fox", "owl", "bear", "goat", "horse", "mouse", "rabbit", "fish"]
COLOURS = ["red", "brown", "black", "white", "grey", "golden", "spotted", "small", "old", "young"]
PLACES = ["garden", "forest", "village", "river", "lake", "hill", "meadow", "barn"]
FOODS = ["apples", "berries", "bread", "carrots", "grass", "honey", "seeds", "fish"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "after the rain", "before sunrise"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# Everyday sentences with the stories' words but none of their plot.
TEMPLATES = [
    "{name} has a {colour} {animal}. The {animal} likes {food}.",
    "On {day} {name} stayed at home and read a book about a {animal}.",
    "The {place} is quiet {time}. Birds sing and the wind is soft.",
    "{name} and {name2} are friends. They play near the {place} every {day}.",
    "A {colour} {animal} lives near the {place}. It sleeps all day and eats {food} at night.",
    "{name} buys {number} loaves of bread and some {food} at the market.",
    "It is cold {time}, so {name} wears a hat and a {colour} coat.",
    "The {animal} is not hungry today. It drinks water and rests in the shade.",
    "{name} paints a picture of the {place} with {number} trees and a {colour} sky.",
    "Every {day} the children count to {number} and then run to the {place}.",
    # Names and animals that come back a sentence later: the base learns to copy them.
    "{name} has a {colour} {animal}. Every {day} {name} gives the {animal} some {food}.",
    "A {animal} sat by the {place}. {name} gave the {animal} {number} {food}, and the {animal} was glad.",
    "{name} met {name2} at the {place}. {name2} showed {name} a {colour} {animal}.",
    # The stories' sentences, each on its own in random company: the base knows the words and
    # phrases; the order, and which animal and food come back, is what the adapter learns.
    "The {colour} {animal} walked to the {place} {time}.",
    "There it found {number} {food} and ate {amount}.",
    "{name} saw the {animal} and said hello.",
    "The {animal} was still hungry, so it looked for more {food}.",
    "The {animal} was happy, so it slept under a tree.",
    "Then {name} counted to {number} and went home.",
]
AMOUNTS = ["all of them", "only a few"]


def corpus(n_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        sentences = []
        for _ in range(rng.randint(3, 5)):
            name, name2 = rng.sample(NAMES, 2)
            sentences.append(
                rng.choice(TEMPLATES).format(
                    name=name,
                    name2=name2,
                    animal=rng.choice(ANIMALS),
                    colour=rng.choice(COLOURS),
                    place=rng.choice(PLACES),
                    food=rng.choice(FOODS),
                    time=rng.choice(TIMES),
                    day=rng.choice(DAYS),
                    number=rng.randint(2, 10),
                    amount=rng.choice(AMOUNTS),
                )
            )
        lines.append(" ".join(sentences))
    return lines


def llama_config() -> dict:
    """The tiny_llama shape (conf/model/tiny_llama.yaml), so the default plan reads the same."""
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=260,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "byte_tokenizer")
    ids = []
    for line in corpus(4000):
        ids += tokenizer(line)["input_ids"]  # <s> line </s>, as the data pipeline tokenizes
    stream = torch.tensor(ids)
    model = LlamaForCausalLM(LlamaConfig(**llama_config()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(stream) - args.length, (args.batch,), generator=generator)
        batch = torch.stack([stream[o : o + args.length] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 250 == 0:
            print(f"step {step}/{args.steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s", flush=True)

    shutil.rmtree(args.out, ignore_errors=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(args.out)
    (args.out / "README.md").write_text(
        "Tiny Llama (hidden 64, 2 layers, byte vocabulary) pretrained by experiments/make_demo_base.py\n"
        f"on {len(ids):,} bytes of everyday sentences, {args.steps} steps; final train loss {loss.item():.3f}.\n"
    )
    print(json.dumps({"out": str(args.out), "final_loss": round(loss.item(), 3)}))


if __name__ == "__main__":
    main()
