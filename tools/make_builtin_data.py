"""Generate the built-in datasets shipped in peftc/assets/data/ (deterministic: fixed seed).

Run `python tools/make_builtin_data.py` after changing a generator; the files are committed so
that training never needs the network. Each row carries its split ("train" / "validation").
"""

from __future__ import annotations

import json
import random
import sys
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


def story_facts(rng: random.Random) -> dict:
    animal, color, place, time, food, friend = (rng.choice(x) for x in (ANIMALS, COLORS, PLACES, TIMES, FOODS, FRIENDS))
    return {"animal": animal, "color": color, "place": place, "time": time, "food": food, "friend": friend}


def story_lines(rng: random.Random, f: dict) -> list[str]:
    animal, food, friend = f["animal"], f["food"], f["friend"]
    count = f["count"] = rng.randint(2, 9)
    lines = [
        f"The {f['color']} {animal} walked to {f['place']} {f['time']}.",
        f"There it found {count} {food} and ate {'all of them' if count < 5 else 'only a few'}.",
        f"{friend} saw the {animal} and said hello.",
        f"The {animal} was {'happy' if count > 4 else 'still hungry'}, so it {'slept under a tree' if count > 4 else 'looked for more ' + food}.",
    ]
    if rng.random() < 0.5:
        lines.append(f"Then {friend} counted to {count + 1} and went home.")
    return lines


def story(rng: random.Random) -> str:
    return " ".join(story_lines(rng, story_facts(rng)))


# ------------------------------------------------------------------------ question_ans
QUESTIONS = [
    ("Where did the {animal} walk?", "place"),
    ("Who saw the {animal}?", "friend"),
    ("What did the {animal} find?", "found"),
    ("When did the {animal} walk to {place}?", "time"),
    ("What color was the {animal}?", "color"),
    ("Which animal walked to {place}?", "animal"),
]


def question(rng: random.Random) -> dict:
    facts = story_facts(rng)
    context = " ".join(story_lines(rng, facts))
    facts["found"] = f"{facts['count']} {facts['food']}"
    template, slot = rng.choice(QUESTIONS)
    return {"question": template.format(**facts), "context": context, "answer": facts[slot]}


def instruction(rng: random.Random) -> dict:
    """A prompt/response pair (data=instructions): one story sentence, a question, its answer."""
    facts = story_facts(rng)
    facts["count"] = rng.randint(2, 9)
    facts["found"] = f"{facts['count']} {facts['food']}"
    shown = f"The {facts['color']} {facts['animal']} walked to {facts['place']} and found {facts['found']}."
    template, slot = rng.choice([q for q in QUESTIONS if q[1] in ("place", "found", "color", "animal")])
    return {"prompt": f"{shown}\nQuestion: {template.format(**facts)}\nAnswer:", "response": f" {facts[slot]}."}


# --------------------------------------------------------------------------- token_cls
def tagged_sentence(rng: random.Random) -> dict:
    """Words of a one-line story, tagged ANIMAL / COLOR / FOOD / NAME / NUMBER / O."""
    facts = story_facts(rng)
    count = rng.randint(2, 9)
    pattern = rng.choice(
        [
            "The {color} {animal} found {count} {food} near {place} .",
            "{friend} saw the {color} {animal} {time} .",
            "{friend} gave {count} {food} to the {animal} .",
            "One {animal} and one {color} {animal2} ate {food} with {friend} .",
        ]
    )
    tags = {
        "color": "COLOR",
        "animal": "ANIMAL",
        "animal2": "ANIMAL",
        "food": "FOOD",
        "friend": "NAME",
        "count": "NUMBER",
    }
    values = {**facts, "count": str(count), "animal2": rng.choice(ANIMALS)}
    tokens, labels = [], []
    for word in pattern.split():
        slot = word[1:-1] if word.startswith("{") else None
        parts = values[slot].split() if slot else [word]
        tokens += parts
        labels += [tags.get(slot, "O")] * len(parts)
    return {"tokens": tokens, "tags": labels}


# ------------------------------------------------------------------- feature_extraction
def paraphrase(rng: random.Random) -> dict:
    """Two wordings of one small event; retrieval must match who did what where."""
    f = story_facts(rng)
    wordings = [
        "The {color} {animal} walked to {place} {time} and met {friend}.",
        "{time_cap}, {friend} met a {color} {animal} that had walked to {place}.",
        "At {place}, {friend} saw the {color} {animal} {time}.",
        "One {animal}, {color} in colour, went to {place} {time}, where {friend} was waiting.",
    ]
    first, second = rng.sample(wordings, 2)
    values = {**f, "time_cap": f["time"][0].upper() + f["time"][1:]}
    return {"anchor": first.format(**values), "positive": second.format(**values)}


# --------------------------------------------------------------------------- sentiment (seq_cls)
NOUNS = ["movie", "meal", "service", "hotel", "book", "concert", "phone", "game", "trip", "class", "show", "room"]
POSITIVE = ["wonderful", "excellent", "delightful", "great", "charming", "superb", "pleasant", "brilliant", "lovely"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "disappointing", "dull", "horrible", "poor", "unpleasant"]
INTENSIFIERS = ["really", "truly", "quite", "very", "absolutely", "rather"]
LIKE = ["loved", "enjoyed", "liked", "adored"]
DISLIKE = ["hated", "disliked", "regretted", "could not stand"]


def sentiment(rng: random.Random) -> dict:
    """Short opinions; negation and 'but'/'although' clauses make the label depend on structure,
    not on one word: 'not bad' is positive, 'lovely, but dull' is negative."""
    positive = rng.random() < 0.5
    noun = rng.choice(NOUNS)
    good, bad = rng.choice(POSITIVE), rng.choice(NEGATIVE)
    form = rng.randrange(6)
    if form == 0:
        text = f"The {noun} was {rng.choice(INTENSIFIERS)} {good if positive else bad}."
    elif form == 1:  # negated adjective flips the polarity
        text = f"The {noun} was not {bad if positive else good}."
    elif form == 2:
        text = f"I {rng.choice(LIKE if positive else DISLIKE)} the {noun}."
    elif form == 3:  # the clause after 'but' decides
        first, second = (bad, good) if positive else (good, bad)
        text = f"The {noun} seemed {first} at first, but it turned out {second}."
    elif form == 4:  # the main clause decides, not the 'although' clause
        adjective = bad if positive else good
        text = f"Although the {noun} was {adjective}, I {rng.choice(LIKE if positive else DISLIKE)} it."
    else:
        text = f"Nobody could call the {noun} {bad if positive else good}."
    return {"text": text, "label": "positive" if positive else "negative"}


# ------------------------------------------------------------------------- seq2seq_lm
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])


def rewrite(rng: random.Random) -> dict:
    """Small string-to-string jobs: spell a number, reverse or sort a few words."""
    form = rng.randrange(3)
    if form == 0:
        n = rng.randrange(100)
        return {"source": f"spell: {n}", "target": number_words(n)}
    words = rng.sample(ANIMALS + COLORS, rng.randint(2, 4))
    if form == 1:
        return {"source": "reverse: " + " ".join(words), "target": " ".join(reversed(words))}
    return {"source": "sort: " + " ".join(words), "target": " ".join(sorted(words))}


GENERATORS: dict[str, tuple[Callable[[random.Random], dict], int, int]] = {
    # name: (row maker, rows, validation rows)
    "causal_lm": (lambda rng: {"text": story(rng)}, 400, 40),
    "seq_cls": (sentiment, 800, 200),
    "seq2seq_lm": (rewrite, 400, 40),
    "token_cls": (tagged_sentence, 400, 40),
    "question_ans": (question, 400, 40),
    "feature_extraction": (paraphrase, 400, 64),
    "instructions": (instruction, 400, 40),
}


def rows(name: str, seed: int = 1234) -> Iterator[dict]:
    make, count, val_count = GENERATORS[name]
    rng = random.Random(seed)
    validation = set(random.Random(seed + 1).sample(range(count), val_count))
    seen: set[str] = set()
    for i in range(count):
        row = make(rng)
        while json.dumps(row, sort_keys=True) in seen:  # no example twice (validation never repeats training)
            row = make(rng)
        seen.add(json.dumps(row, sort_keys=True))
        yield {**row, "split": "validation" if i in validation else "train"}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[1:] or GENERATORS:
        path = OUT / f"{name}.jsonl"
        with path.open("w") as fh:
            for row in rows(name):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
