"""Generate the built-in datasets shipped in peftc/assets/data/ (deterministic: fixed seed).

Run `python tools/make_builtin_data.py` after changing a generator; the files are committed so
that training never needs the network. Each row carries its split ("train" / "validation").
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "peftc" / "assets" / "data"

ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "goat", "duck", "bear", "mouse"]
COLORS = ["red", "brown", "grey", "white", "black", "golden", "spotted", "small", "old", "young"]
PLACES = [
    "the garden",
    "the forest",
    "the river",
    "the barn",
    "the hill",
    "the village",
    "the meadow",
    "the lake",
]
TIMES = [
    "in the morning",
    "at noon",
    "in the evening",
    "at night",
    "after the rain",
    "before sunrise",
]
FOODS = ["apples", "seeds", "fish", "berries", "bread", "carrots", "honey", "grass"]
FRIENDS = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo"]


def story(rng: random.Random) -> str:
    animal, color, place, time, food, friend = (rng.choice(x) for x in (ANIMALS, COLORS, PLACES, TIMES, FOODS, FRIENDS))
    count = rng.randint(2, 9)
    lines = [
        f"The {color} {animal} walked to {place} {time}.",
        f"There it found {count} {food} and ate {'all of them' if count < 5 else 'only a few'}.",
        f"{friend} saw the {animal} and said hello.",
        f"The {animal} was {'happy' if count > 4 else 'still hungry'}, so it {'slept under a tree' if count > 4 else 'looked for more ' + food}.",
    ]
    if rng.random() < 0.5:
        lines.append(f"Then {friend} counted to {count + 1} and went home.")
    return " ".join(lines)


GENERATORS: dict[str, tuple[Callable[[random.Random], dict], int]] = {
    "causal_lm": (lambda rng: {"text": story(rng)}, 400),
}


def rows(name: str, seed: int = 1234) -> Iterator[dict]:
    make, count = GENERATORS[name]
    rng = random.Random(seed)
    validation = set(random.Random(seed + 1).sample(range(count), count // 10))
    for i in range(count):
        yield {**make(rng), "split": "validation" if i in validation else "train"}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in GENERATORS:
        path = OUT / f"{name}.jsonl"
        with path.open("w") as fh:
            for row in rows(name):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
