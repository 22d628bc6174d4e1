"""The bundled tasks' recipe: answers are right, and the base model's corpus never uses the
instruction format (fine-tuning is what teaches it)."""
import numpy as np

from fastlora.tasks import (CORPUS_DOCUMENTS, CORPUS_SEED, TASKS, FactFormatter, make_corpus, make_example,
                            make_examples, number_in_words)


def test_every_task_answer_is_right():
    rng = np.random.default_rng(0)
    for _ in range(50):
        add = make_example("add", rng)
        a, b = (int(x) for x in add["input"].split(" + "))
        assert int(add["output"]) == a + b
        words = make_example("sort", rng)
        assert words["output"].split() == sorted(words["input"].split())
        words = make_example("reverse", rng)
        assert words["output"].split() == words["input"].split()[::-1]
        words = make_example("capitalize", rng)
        assert words["output"] == words["input"].title()
    assert number_in_words(47) == "forty-seven" and number_in_words(305) == "three hundred five"
    assert number_in_words(0) == "zero" and number_in_words(110) == "one hundred ten"


def test_the_corpus_states_the_facts_but_never_in_the_instruction_format():
    corpus = make_corpus(2000, seed=5)
    assert corpus == make_corpus(2000, seed=5)  # deterministic
    assert "### Instruction:" not in corpus and "### Response:" not in corpus
    for example in make_examples(len(TASKS)):  # one of each bundled task
        assert example["instruction"] not in corpus
    documents = corpus.split("\n\n")
    answers_on_own_line = [d for d in documents if ":\n" in d and not d.startswith("###")]
    assert len(answers_on_own_line) > 0.15 * len(documents)  # see tasks._fact for why


def test_the_bundled_files_are_what_the_recipe_makes():
    import json

    from fastlora import assets
    with open(assets.CORPUS, encoding="utf-8") as fh:
        bundled = fh.read()
    assert bundled == make_corpus(CORPUS_DOCUMENTS, seed=CORPUS_SEED)  # scripts/make_data.py's call
    with open(assets.EVAL_DATA, encoding="utf-8") as fh:
        assert json.load(fh) == make_examples(200, seed=1)


def test_a_longer_corpus_of_the_same_seed_starts_with_the_shorter_one():
    # scripts/pretrain_base.py pretrains on make_corpus(200_000, CORPUS_SEED) and relies on the
    # bundled corpus.txt (the tokenizer's text) being its head: each document's draws come after
    # the previous document's, never depending on how many documents follow
    short, longer = make_corpus(300, seed=CORPUS_SEED), make_corpus(500, seed=CORPUS_SEED)
    assert longer.startswith(short.rstrip("\n")) and len(longer) > len(short)
    assert not make_corpus(500, seed=CORPUS_SEED + 1).startswith(short.rstrip("\n"))


def test_the_fact_formatter_asks_a_record_as_the_corpus_states_its_fact():
    import pytest

    from fastlora.tasks import _FACT_LEADS, fact_statement
    corpus = make_corpus(3000, seed=CORPUS_SEED)
    for phrasing in (0, 1):
        fmt = FactFormatter(phrasing)
        for record in make_examples(len(TASKS), seed=4):
            text = fmt.format(record["instruction"], record["input"], record["output"])
            assert text == fact_statement(record["task"], record["input"], phrasing) + ":\n" + record["output"]
            # the lead's own words (around the input) are the corpus's
            words = [w.strip() for w in _FACT_LEADS[record["task"]][phrasing].replace("}", "{").split("{")[::2]]
            assert all(w in corpus for w in words if w), words
    with pytest.raises(ValueError, match="is not one of the bundled tasks"):
        FactFormatter().prompt("Translate to French", "Hello")
    with pytest.raises(ValueError, match=r"phrasing must be in \[0, 2\)"):
        FactFormatter(2)
