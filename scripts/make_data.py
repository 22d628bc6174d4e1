"""Write the bundled data of fastlora/assets from the recipe in fastlora/tasks.py.

    python scripts/make_data.py

instructions_train.json (2,000 records), instructions_eval.json (200, another seed) and
corpus.txt (the first 20,000 documents of the base model's pretraining prose). Deterministic: running it again gives the
same bytes.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastlora.tasks import CORPUS_DOCUMENTS, CORPUS_SEED, make_corpus, make_examples  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fastlora", "assets")


def main():
    os.makedirs(ASSETS, exist_ok=True)
    for name, n, seed in (("instructions_train.json", 2000, 0), ("instructions_eval.json", 200, 1)):
        with open(os.path.join(ASSETS, name), "w", encoding="utf-8") as fh:
            json.dump(make_examples(n, seed), fh, indent=0)
            fh.write("\n")
    with open(os.path.join(ASSETS, "corpus.txt"), "w", encoding="utf-8") as fh:
        fh.write(make_corpus(CORPUS_DOCUMENTS, seed=CORPUS_SEED))
    print("wrote", sorted(os.listdir(ASSETS)))


if __name__ == "__main__":
    main()
