"""Peak memory of FinetuneDataset on one huge JSONL line, and of streaming a large JSONL file.

    python scripts/measure_data_memory.py line 100      # one record whose input is 100 MB
    python scripts/measure_data_memory.py answer 100    # one record whose output is 100 MB
    python scripts/measure_data_memory.py file 1000     # 1000 MB of ordinary records

Prints the peak of Python's allocations (tracemalloc) and the process's peak RSS, each as a
multiple of the data's size, with the bundled BPE tokenizer at max_length 256. Run it in a
fresh process per measurement (peak RSS only grows).
"""
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fastlora as fl  # noqa: E402
from fastlora import assets  # noqa: E402
from fastlora.data import FinetuneDataset  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly zebras".split()


def write_line(path, mb, field="input"):
    """One Alpaca record whose input (or output) is `mb` MB of prose, written a piece at a time (low memory)."""
    piece = "".join(w + (" " if i % 17 else ".\\n") for i, w in enumerate(WORDS * 64))  # \\n: JSON's escape
    with open(path, "w") as fh:
        fh.write('{"instruction": "Summarize the text.", "%s": "' % field)
        for _ in range((mb << 20) // len(piece)):
            fh.write(piece)
        fh.write('", "%s": "A fox and a dog."}\n' % ("output" if field == "input" else "input"))


def write_file(path, mb):
    rng_words = WORDS * 4
    with open(path, "w") as fh:
        size, i = 0, 0
        while size < mb << 20:
            k = i % len(WORDS)
            record = {"instruction": " ".join(rng_words[k:k + 12]), "input": " ".join(rng_words[k + 3:k + 30]),
                      "output": " ".join(rng_words[k + 5:k + 25])}
            line = json.dumps(record) + "\n"
            fh.write(line)
            size += len(line)
            i += 1


def main():
    kind, mb = sys.argv[1], int(sys.argv[2])
    tok = fl.load_tokenizer(assets.TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.jsonl")
        if kind == "file":
            write_file(path, mb)
        else:
            write_line(path, mb, "input" if kind == "line" else "output")
        size = os.path.getsize(path)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tracemalloc.start()
        start = time.perf_counter()
        ds = FinetuneDataset(path, tok, max_length=256, progress=False)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{kind} {size / 2**20:.0f} MB: {len(ds)} examples, {int(ds.lengths.sum()):,} tokens kept in {seconds:.1f} s; "
          f"peak traced {peak / 2**20:.0f} MB ({peak / size:.2f}x); peak RSS {rss / 2**20:.0f} MB, "
          f"{(rss - base_rss) / 2**20:.0f} MB above the start ({(rss - base_rss) / size:.2f}x)")


if __name__ == "__main__":
    main()
