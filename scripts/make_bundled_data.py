"""Regenerate the bundled datasets and the tiny model's tokenizer.

Writes finetune/data/bundled/instructions.jsonl (alpaca format: instruction / input / output),
finetune/data/bundled/preferences.jsonl (preference format, conversational: prompt / chosen /
rejected, for the dpo recipe) and finetune/models/tiny_tokenizer.json. Every row is generated
here from templates with a fixed seed, so the data is license-clean and the output is
byte-identical on every run. The tokenizer is trained on the instruction rows only, so adding
the preference data changed neither it nor the tiny model:

    python scripts/make_bundled_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_FILE = ROOT / "finetune" / "data" / "bundled" / "instructions.jsonl"
PREFERENCE_FILE = ROOT / "finetune" / "data" / "bundled" / "preferences.jsonl"
TOKENIZER_FILE = ROOT / "finetune" / "models" / "tiny_tokenizer.json"

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
ANIMALS = ["cat", "dog", "horse", "owl", "fox", "bear", "whale", "otter", "eagle", "rabbit",
           "lion", "tiger", "mouse", "goat", "sheep", "camel", "zebra", "panda", "wolf", "frog"]
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]
WORDS = ANIMALS + FRUITS + ["river", "mountain", "forest", "garden", "window", "candle", "bridge",
                            "letter", "planet", "rocket", "piano", "pencil", "castle", "island"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
             "open": "closed", "early": "late", "happy": "sad", "full": "empty", "old": "new",
             "high": "low", "hard": "soft", "left": "right", "wet": "dry", "near": "far"}


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice(["+", "-", "*"])
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"instruction": "Compute the result of the expression.", "input": f"{a} {op} {b}",
            "output": f"{a} {op} {b} = {result}."}


def _reverse(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
            "output": " ".join(reversed(words))}


def _sort(rng: random.Random) -> dict:
    numbers = [rng.randint(0, 50) for _ in range(rng.randint(3, 7))]
    ascending = rng.random() < 0.5
    order = "ascending" if ascending else "descending"
    ordered = sorted(numbers, reverse=not ascending)
    return {"instruction": f"Sort these numbers in {order} order.",
            "input": ", ".join(map(str, numbers)), "output": ", ".join(map(str, ordered))}


def _count_letters(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    count = word.count(letter)
    times = "time" if count == 1 else "times"
    return {"instruction": f"How many times does the letter '{letter}' appear in the word?",
            "input": word, "output": f"The letter '{letter}' appears {count} {times} in '{word}'."}


def _number_word(rng: random.Random) -> dict:
    n = rng.randint(0, 20)
    if rng.random() < 0.5:
        return {"instruction": "Write the number in words.", "input": str(n),
                "output": NUMBER_WORDS[n]}
    return {"instruction": "Write the word as a number.", "input": NUMBER_WORDS[n],
            "output": str(n)}


def _opposite(rng: random.Random) -> dict:
    word, opposite = rng.choice(sorted(OPPOSITES.items()))
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return {"instruction": "Give the opposite of the word.", "input": word, "output": opposite}


def _describe(rng: random.Random) -> dict:
    colour, animal = rng.choice(COLOURS), rng.choice(ANIMALS)
    n = rng.randint(2, 9)
    return {"instruction": f"Write one sentence about {n} {colour} {animal}s.", "input": "",
            "output": f"There were {NUMBER_WORDS[n]} {colour} {animal}s resting by the "
                      f"{rng.choice(['river', 'forest', 'garden', 'bridge', 'castle'])}."}


def _uppercase(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(2, 4))
    text = " ".join(words)
    return {"instruction": "Convert the text to upper case.", "input": text,
            "output": text.upper()}


def _max(rng: random.Random) -> dict:
    numbers = rng.sample(range(0, 100), rng.randint(3, 6))
    return {"instruction": "Which number is the largest?", "input": " ".join(map(str, numbers)),
            "output": f"The largest number is {max(numbers)}."}


def _fruit_or_animal(rng: random.Random) -> dict:
    word = rng.choice(ANIMALS + FRUITS)
    kind = "an animal" if word in ANIMALS else "a fruit"
    return {"instruction": "Is this word a fruit or an animal?", "input": word,
            "output": f"'{word}' is {kind}."}


TASKS = [_arithmetic, _reverse, _sort, _count_letters, _number_word, _opposite, _describe,
         _uppercase, _max, _fruit_or_animal]


def generate_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """Return `n_rows` alpaca rows, the same for the same seed."""
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(n_rows)]


# The preference pairs teach a visible taste: the concise answer is chosen over the same answer
# wrapped in filler, so a DPO run's reward margin and accuracy rise within a short run.
RAMBLE_OPENERS = [
    "Well, that is a very interesting question, and I am glad you asked it.",
    "Let me think about this carefully for a moment before I answer.",
    "Great question! There are many ways to look at this, so let me explain.",
    "Sure, I can help with that. First, some background on the question.",
    "Hmm, this one takes a little thought, but I believe I know the answer.",
]
RAMBLE_CLOSERS = [
    "I hope this helps, and let me know if you have any other questions!",
    "Of course, there is always more that could be said about this topic.",
    "Please double check it yourself, as it is always good to be careful.",
    "That is my answer, although other people might explain it differently.",
    "Thank you for asking, it was a pleasure to think about this with you.",
]


def generate_preference_rows(n_rows: int, seed: int = 1) -> list[dict]:
    """Return `n_rows` conversational preference rows (prompt / chosen / rejected): the
    instruction tasks' exact answer is chosen, the same answer padded with filler rejected."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        task = TASKS[i % len(TASKS)](rng)
        question = task["instruction"] + (f"\n\n{task['input']}" if task["input"] else "")
        rambling = (f"{rng.choice(RAMBLE_OPENERS)} {task['output']} "
                    f"{rng.choice(RAMBLE_CLOSERS)}")
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "chosen": [{"role": "assistant", "content": task["output"]}],
                     "rejected": [{"role": "assistant", "content": rambling}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(rows: list[dict], vocab_size: int = 4096) -> str:
    """Train a SentencePiece-style BPE tokenizer on the rows and return its JSON.

    Spaces become "\u2581" and start a word (Metaspace, nothing prepended), and any character
    outside the vocabulary falls back to its UTF-8 bytes (<0x00>..<0xFF>), so decoding the ids
    of any text gives the text back exactly. Splitting on spaces alone needs no regex, which
    makes this tokenizer 1.5-1.7x faster than a byte-level one with the GPT-2 pattern.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)],
        show_progress=False,
    )
    # Each field as it appears in a rendered conversation, where it follows a newline.
    corpus = [str(value) for row in rows for value in row.values() if value]
    corpus += ["You are a helpful assistant. Answer briefly and exactly."]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # The byte pieces were listed as special only to give them the ids after the specials; they
    # are vocabulary, as in SentencePiece: the literal text "<0x41>" is not the byte "A", and
    # decoding without special tokens keeps the bytes.
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    return json.dumps(spec, ensure_ascii=False, separators=(",", ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preference-rows", type=int, default=1000)
    args = parser.parse_args()
    rows = generate_rows(args.rows, args.seed)
    write_jsonl(DATA_FILE, rows)
    TOKENIZER_FILE.write_text(train_tokenizer(rows), encoding="utf-8")
    preferences = generate_preference_rows(args.preference_rows, args.seed + 1)
    write_jsonl(PREFERENCE_FILE, preferences)
    print(f"wrote {len(rows)} rows to {DATA_FILE.relative_to(ROOT)}")
    print(f"wrote {len(preferences)} rows to {PREFERENCE_FILE.relative_to(ROOT)}")
    print(f"wrote tokenizer to {TOKENIZER_FILE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
