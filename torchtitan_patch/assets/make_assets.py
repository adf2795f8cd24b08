"""Regenerate the offline corpus and tokenizer shipped in this folder.

The debug runs must train without a network, so the project writes its own text: a seeded
generator of short English stories, counting drills and arithmetic facts. The text is
produced entirely by this script (no third-party text), so it ships under the project's
licence. A byte-level BPE tokenizer with the debug models' vocabulary size (2048) is then
trained on it with the ``tokenizers`` library. Both outputs are deterministic:

    python -m torchtitan_patch.assets.make_assets
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus" / "stories.txt"
TOKENIZER_DIR = HERE / "tokenizer"
VOCAB_SIZE = 2048
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

NAMES = ["Ada", "Ben", "Cora", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "June", "Kai", "Lena",
         "Milo", "Nora", "Omar", "Pia", "Quin", "Rosa", "Sam", "Tess", "Uma", "Vic", "Wren", "Zoe"]
ANIMALS = ["cat", "dog", "fox", "owl", "hen", "goat", "frog", "bear", "duck", "mouse", "horse", "crow"]
PLACES = ["the forest", "the river", "the market", "the old mill", "the hill", "the harbor",
          "the garden", "the library", "the bakery", "the station", "the farm", "the bridge"]
THINGS = ["a red ball", "a small key", "a blue kite", "a warm loaf", "a wooden boat", "a silver coin",
          "a paper map", "a green apple", "a tin cup", "a long rope", "a brass bell", "a yellow hat"]
FEELINGS = ["happy", "tired", "curious", "proud", "hungry", "brave", "sleepy", "glad", "calm", "worried"]
WEATHER = ["It was a sunny morning.", "Rain fell all day.", "The wind was cold.", "Snow covered the roofs.",
           "The evening was warm and quiet.", "Fog hid the valley."]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen", "twenty"]


def _story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    pet, place, other = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(PLACES)
    thing, feeling = rng.choice(THINGS), rng.choice(FEELINGS)
    lines = [
        rng.choice(WEATHER),
        f"{a} walked to {place} with a {pet}.",
        f"At {place}, {a} found {thing}.",
        f"{a} showed {thing} to {b}.",
        f'"Where did you find it?" asked {b}.',
        f'"I found it at {place}," said {a}.',
        f"Then {a} and {b} took {thing} to {other}.",
        f"The {pet} followed them all the way to {other}.",
        f"In the end {a} felt {feeling}, and {b} felt {rng.choice(FEELINGS)}.",
    ]
    keep = [lines[0], lines[1], lines[2]] + [l for l in lines[3:-1] if rng.random() < 0.8] + [lines[-1]]
    return " ".join(keep)


def _counting(rng: random.Random) -> str:
    start = rng.randrange(0, 12)
    length = rng.randrange(4, 9)
    words = NUMBERS[start:start + length]
    return f"Count with me: {', '.join(words)}."


def _arithmetic(rng: random.Random) -> str:
    x, y = rng.randrange(0, 11), rng.randrange(0, 11)
    if rng.random() < 0.5:
        return f"{NUMBERS[x].capitalize()} plus {NUMBERS[y]} is {NUMBERS[x + y]}."
    hi, lo = max(x, y), min(x, y)
    return f"{NUMBERS[hi].capitalize()} minus {NUMBERS[lo]} is {NUMBERS[hi - lo]}."


def make_corpus(documents: int, seed: int) -> list[str]:
    """One document per line: a story, then a few drills, so each line mixes the patterns."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        parts = [_story(rng)] + [rng.choice((_counting, _arithmetic))(rng) for _ in range(rng.randrange(1, 4))]
        docs.append(" ".join(parts))
    return docs


def train_tokenizer(corpus: Path, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    # torchtitan's HuggingFaceTokenizer reads BOS/EOS from here and adds them itself.
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    CORPUS.write_text("\n".join(make_corpus(args.documents, args.seed)) + "\n")
    train_tokenizer(CORPUS, TOKENIZER_DIR)
    print(f"wrote {CORPUS} ({CORPUS.stat().st_size} bytes) and {TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
