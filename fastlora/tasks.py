"""The bundled instruction tasks: small, checkable, and generated from a documented recipe.

Every task has an exact answer, so exact-match accuracy of generations means something:

    add          "Add the two numbers."              "23 + 58"          -> "81"
    reverse      "Reverse the order of the words."   "red fox jumps"    -> "jumps fox red"
    sort         "Sort the words alphabetically."    "pear apple fig"   -> "apple fig pear"
    capitalize   "Capitalize every word."            "new york city"    -> "New York City"
    number_words "Write the number in words."        "47"               -> "forty-seven"

`make_examples(n, seed)` draws them; `scripts/make_data.py` writes the bundled files with it.
`make_corpus(n, seed)` writes the plain-prose pretraining corpus of the tiny base model: the same
words and numbers in sentences, including statements of the tasks' facts ("23 plus 58 is 81.",
"Sorted, the words pear apple fig are apple fig pear."), but never in the instruction format.
So, like a real base model, it has the skills and not the format (scripts/pretrain_base.py
says what that took): fine-tuning teaches it to answer "### Instruction: ... ### Response:",
which is what LoRA and full fine-tuning are compared on.
The corpus has markdown-like "### Notes:" headers too, so the template's pieces are known text.
"""
import numpy as np

WORDS = (
    "apple bird blue book boat bread cake car cat city cloud cold day dog door dream fish fig "
    "flower forest fox friend garden gold green hat hill house ice king lake lamp leaf light "
    "lion moon mountain night ocean orange pear pen queen rain red river road rock rose sand "
    "sea ship silver sky snow song star stone sun table tea tree wind window winter wolf wood"
).split()

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen " \
        "fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

TASKS = ("add", "reverse", "sort", "capitalize", "number_words")
INSTRUCTIONS = {
    "add": "Add the two numbers.",
    "reverse": "Reverse the order of the words.",
    "sort": "Sort the words alphabetically.",
    "capitalize": "Capitalize every word.",
    "number_words": "Write the number in words.",
}

# The pretraining corpus is make_corpus(n, CORPUS_SEED) for a large n (scripts/pretrain_base.py);
# its first CORPUS_DOCUMENTS documents are bundled as assets/corpus.txt, the tokenizer's text.
CORPUS_SEED = 2
CORPUS_DOCUMENTS = 20000


def number_in_words(n):
    """0 <= n < 1000 in English words: 47 -> 'forty-seven', 305 -> 'three hundred five'."""
    if not 0 <= n < 1000:
        raise ValueError(f"n must be in [0, 1000), got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("-" + _ONES[ones] if ones else "")
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + (" " + number_in_words(rest) if rest else "")


def _words(rng, low=3, high=5):
    return [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(low, high + 1)), replace=False)]


def make_example(task, rng):
    """One {"instruction", "input", "output", "task"} record of `task`."""
    if task == "add":
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        return {"instruction": INSTRUCTIONS["add"], "input": f"{a} + {b}", "output": str(a + b)}
    if task == "reverse":
        w = _words(rng)
        return {"instruction": INSTRUCTIONS["reverse"], "input": " ".join(w),
                "output": " ".join(reversed(w))}
    if task == "sort":
        w = _words(rng)
        return {"instruction": INSTRUCTIONS["sort"], "input": " ".join(w),
                "output": " ".join(sorted(w))}
    if task == "capitalize":
        w = _words(rng, 2, 4)
        return {"instruction": INSTRUCTIONS["capitalize"], "input": " ".join(w),
                "output": " ".join(x.capitalize() for x in w)}
    if task == "number_words":
        n = int(rng.integers(0, 200))
        return {"instruction": INSTRUCTIONS["number_words"], "input": str(n), "output": number_in_words(n)}
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def make_examples(n, seed=0):
    """n examples, the tasks in turn, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return [{**make_example(TASKS[i % len(TASKS)], rng), "task": TASKS[i % len(TASKS)]} for i in range(n)]


_HEADERS = ("Facts", "Story", "Numbers", "Words", "Notes")

_SENTENCES = (
    "the {a} saw a {b} near the {c}.",
    "a {a} and a {b} went to the {c}.",
    "there are {n} {a}s by the {b}.",
    "{N} is written as {n}.",
    "she found {n} {a}s and {m} {b}s.",
    "the {a} is older than the {b}, and the {c} is older still.",
    "in winter the {a} sleeps under the {b}.",
    "my friend has a {a}, a {b} and a {c}.",
    "{n} and {m} are numbers.",
    "the words were {a}, {b}, {c} and {d}.",
)


PHRASINGS = 2  # ways each fact is said; see _fact for why two
_FACT_LEADS = {  # each task's fact in words other than the template's
    "add": ("{a} plus {b} is", "The sum of {a} and {b} is"),
    "reverse": ("The words {x} in reverse order are", "Reversed, the words {x} are"),
    "sort": ("Sorted, the words {x} are", "The words {x} in alphabetical order are"),
    "capitalize": ("Capitalized, {x} reads", "The words {x} with capitals are"),
    "number_words": ("{x} is written as", "In words, {x} is"),
}


def fact_statement(task, input_, phrasing=0):
    """The corpus's prose for a task's input, before its answer: ("reverse", "red fox", 0) ->
    "The words red fox in reverse order are"; phrasing 1 names the operation first."""
    a, _, b = input_.partition(" + ")
    return _FACT_LEADS[task][phrasing].format(a=a, b=b, x=input_)


class FactFormatter:
    """A FinetuneDataset formatter that asks a task record the way the pretraining corpus states
    its fact, "{fact_statement}:\n{output}", instead of the instruction template: what the base
    model can do before any fine-tuning, and how much of it a fine-tuned model kept."""

    def __init__(self, phrasing=0):
        if phrasing not in range(PHRASINGS):
            raise ValueError(f"phrasing must be in [0, {PHRASINGS}), got {phrasing!r}")
        self.phrasing = phrasing
        self._task_of = {instruction: task for task, instruction in INSTRUCTIONS.items()}

    def prompt(self, instruction, input=""):  # noqa: A002 - the Alpaca field is called input
        if instruction not in self._task_of:
            raise ValueError(f"instruction {instruction!r} is not one of the bundled tasks' "
                             f"({sorted(self._task_of)})")
        return fact_statement(self._task_of[instruction], input, self.phrasing) + ":\n"

    def format(self, instruction, input, output):  # noqa: A002
        return self.prompt(instruction, input) + output


def _fact(task, rng):
    """One task's input and answer said in prose, outside the instruction format: inline
    ("23 plus 58 is 81.") or, half the time, with the answer on its own line after a colon.

    The answer-on-its-own-line forms matter: a BPE tokenizer spells a word at the start of a
    line ("apple") with other tokens than after a space (" apple"), and an answer starts a line
    in the instruction format too. Without them the first token of most answers was never seen
    in pretraining, and only fine-tuning that trains the (tied) embedding could learn it.

    Each task has two phrasings, one naming the operation before the input and one after it,
    as varied text does. The instruction format names it before; with the cue only after the
    input ("The words ... in reverse order are"), a rank-8 LoRA learnt to reverse in the
    instruction format in some seeds and not in others.
    """
    ex = make_example(task, rng)
    x, y = ex["input"], ex["output"]
    statement = fact_statement(task, x, int(rng.integers(PHRASINGS)))
    if rng.random() < 0.5:
        return f"{statement}:\n{y}"
    if task == "add" and rng.random() < 0.5:
        return f"{x} = {y}"
    return f"{statement} {y}."


def make_corpus(n_documents, seed=0, fact_share=0.5):
    """Plain prose over the task vocabulary (the base model's corpus): short documents separated
    by blank lines, a tenth of them under a markdown-like header; `fact_share` of them state a
    task's fact (see `_fact`), the rest are sentences over the same words and numbers."""
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(n_documents):
        # markdown-like section headers, as web text has; never the template's
        header = f"### {_HEADERS[int(rng.integers(len(_HEADERS)))]}:\n" if rng.random() < 0.1 else ""
        if rng.random() < fact_share:
            documents.append(header + _fact(TASKS[int(rng.integers(len(TASKS)))], rng))
            continue
        template = _SENTENCES[int(rng.integers(len(_SENTENCES)))]
        a, b, c, d = _words(rng, 4, 4)
        n, m = (int(x) for x in rng.integers(0, 200, size=2))
        text = template.format(a=a, b=b, c=c, d=d, n=number_in_words(n), m=number_in_words(m), N=n)
        documents.append(header + text[0].upper() + text[1:])
    return "\n\n".join(documents) + "\n"
