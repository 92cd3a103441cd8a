"""Regenerates the small sample corpus we ship under data/sample/ (deterministic, no downloads).

A tiny closed world of facts (capitals, opposites, sums, colours, animal sounds) in two shapes:
plain sentences to pretrain the tiny base on, and question/answer pairs for SFT. A model with
hidden size 64 can learn it in a few hundred CPU steps, so the demo's loss curves mean something.

Those Q/A pairs are memorization: a held-out question is a new fact no adapter can know. The
lookup task (lookup_*.jsonl) is one the tiny base can learn and generalize: read a field out of the
prompt ("Name: Italy. Town: Lima.\nTown?" -> " Lima."). Held-out rows are (name, town) pairings
never seen in training, and every held-out town was seen as an answer in training: "held-out"
means unseen combinations of seen items, not unseen words (an adapter cannot copy words it never
produced; ../shared/NEMO_CPU.md).

    python data/make_sample.py   # rewrites data/sample/*
"""
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Chile": "Santiago", "Greece": "Athens",
    "Norway": "Oslo", "Cuba": "Havana", "Canada": "Ottawa", "Poland": "Warsaw", "Ireland": "Dublin",
    "Austria": "Vienna", "Portugal": "Lisbon", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Hungary": "Budapest", "Russia": "Moscow", "China": "Beijing", "India": "Delhi", "Mexico": "Mexico City",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "early": "late", "open": "closed", "full": "empty", "old": "new", "hard": "soft", "loud": "quiet",
    "rich": "poor", "wet": "dry", "near": "far", "high": "low",
}
COLOURS = {
    "grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown", "ash": "grey",
}
SOUNDS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "sheep": "bleats",
    "horse": "neighs", "owl": "hoots", "pig": "oinks", "snake": "hisses", "bee": "buzzes", "frog": "croaks",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def facts():
    """Every fact as (sentence, question, answer)."""
    for country, city in CAPITALS.items():
        yield f"The capital of {country} is {city}.", f"What is the capital of {country}?", f"{city}."
    for word, opp in OPPOSITES.items():
        yield f"The opposite of {word} is {opp}.", f"What is the opposite of {word}?", f"{opp.capitalize()}."
    for thing, colour in COLOURS.items():
        yield f"The colour of {thing} is {colour}.", f"What colour is {thing}?", f"{colour.capitalize()}."
    for animal, sound in SOUNDS.items():
        yield f"The {animal} {sound}.", f"What does the {animal} do?", f"It {sound}."
    for a in range(10):
        for b in range(10):
            if (a * 7 + b * 3) % 2 == 0:  # a fixed half, so some sums stay unseen in pretraining text
                yield (f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.",
                       f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a + b].capitalize()}.")


def main(out=Path(__file__).parent / "sample"):
    rng = random.Random(1234)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(facts())
    # Pretraining text: the facts as running sentences, shuffled into short paragraphs.
    lines = []
    for _ in range(12):
        sentences = [r[0] for r in rows]
        rng.shuffle(sentences)
        for i in range(0, len(sentences), 4):
            lines.append(" ".join(sentences[i:i + 4]))
    (out / "pretrain.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # SFT pairs in NeMo's {input, output} shape; the answer starts with a space so that
    # SentencePiece tokenizes the prompt as an exact prefix of prompt + answer.
    qa = [{"input": f"Question: {q}\nAnswer:", "output": f" {a}"} for _, q, a in rows]
    rng.shuffle(qa)
    n_val = 16
    for name, part in (("sft_train.jsonl", qa[n_val:]), ("sft_validation.jsonl", qa[:n_val])):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(lines)} pretraining lines and {len(qa)} SFT rows ({n_val} validation) to {out}")
    write_lookup(out)


def lookup_row(rng, name, town):
    fields = [f"Name: {name}.", f"Town: {town}."]
    rng.shuffle(fields)  # the fields in either order: the adapter must read, not count
    return {"input": " ".join(fields) + "\nTown?", "output": f" {town}."}


def lookup_split(rng, n_train=240, n_validation=20, n_test=40, max_alike=2):
    """(train, validation, test) lookup rows: pairings disjoint across splits, no country with its real
    capital (the base knows those facts), each held-out town at most `max_alike` times and seen as a
    training answer."""
    pairs = [(n, t) for n in CAPITALS for t in CAPITALS.values() if CAPITALS[n] != t and t != "Mexico City"]
    rng.shuffle(pairs)
    held, used = {"validation": [], "test": []}, {}
    for pair in pairs:
        for split, want in (("test", n_test), ("validation", n_validation)):
            if len(held[split]) < want and used.get((split, pair[1]), 0) < max_alike:
                held[split].append(pair)
                used[(split, pair[1])] = used.get((split, pair[1]), 0) + 1
                break
    taken = set(held["test"]) | set(held["validation"])
    train = [p for p in pairs if p not in taken][:n_train]
    answers = {t for _, t in train}
    assert all(t in answers for _, t in taken), "a held-out town never appears as a training answer"
    return ([lookup_row(rng, *p) for p in train], [lookup_row(rng, *p) for p in held["validation"]],
            [lookup_row(rng, *p) for p in held["test"]])


def write_lookup(out):
    rng = random.Random(4321)  # its own stream: the files above stay byte for byte what they were
    splits = lookup_split(rng)
    for name, rows in zip(("train", "validation", "test"), splits):
        with open(out / f"lookup_{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # Preferences on the same prompts (and splits): the town asked for is chosen, the other field's
    # value (the name) rejected. Learnable by reading the prompt, as the SFT task is; held out the same way.
    for name, rows in zip(("train", "validation", "test"), splits):
        with open(out / f"lookup_pref_{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                other = r["input"].split("Name: ", 1)[1].split(".", 1)[0]
                f.write(json.dumps({"prompt": r["input"], "chosen": r["output"], "rejected": f" {other}."},
                                   ensure_ascii=False) + "\n")
    print(f"wrote the lookup task (lookup_*.jsonl, lookup_pref_*.jsonl) to {out}")


if __name__ == "__main__":
    main()
