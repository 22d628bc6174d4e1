"""Data pipeline speed: building a FinetuneDataset (records/s) and one DataLoader epoch.

    python -m pytest bench/test_bench_data.py -s --benchmark-columns=median,ops

12,000 Alpaca-style records cut from the synthetic corpus of test_bench_tokenizer.py, a BPE
tokenizer of 4,096 tokens trained on them, max_length 256, batches of 16 (the `small`
workload's batch is 8; 16 makes collation the larger share). The loader epoch is timed
plain and length-grouped, and the padding each leaves is reported.
"""
import re

import pytest

from fastlora.data import BPETokenizer, DataLoader, FinetuneDataset, InstructionFormatter
from test_bench_tokenizer import synthetic_text

N_RECORDS = 12000


@pytest.fixture(scope="module")
def records():
    sentences = re.split(r"(?<=[.?!:,])\s+", synthetic_text(4_000_000, seed=1))
    out = []
    for i in range(0, 3 * N_RECORDS, 3):
        out.append({"instruction": sentences[i], "input": sentences[i + 1] if i % 2 else "",
                    "output": sentences[i + 2]})
    return out


@pytest.fixture(scope="module")
def tokenizer(records):
    fmt = InstructionFormatter()
    return BPETokenizer.train([fmt.format(r["instruction"], r["input"], r["output"])
                               for r in records], vocab_size=4096)


def test_dataset_build(benchmark, records, tokenizer):
    def build():
        tokenizer._cache.clear()  # cold: every distinct piece goes through the kernel
        return FinetuneDataset(records, tokenizer, max_length=256)

    dataset = benchmark.pedantic(build, rounds=3, iterations=1)
    assert len(dataset) + dataset.skipped == N_RECORDS
    # checked before the number means anything: item 0 is prompt (masked) + output + EOS
    first, item = records[dataset.skipped_indices.count(0)], dataset[0]
    n_prompt = len(tokenizer.encode(InstructionFormatter().prompt(first["instruction"],
                                                                  first["input"])))
    assert item["labels"][:n_prompt] == [-100] * n_prompt
    assert item["labels"][n_prompt:] == (tokenizer.encode(first["output"])
                                         + [tokenizer.eos_token_id])[:256 - n_prompt]
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        seconds = float(stats.stats.median)
        benchmark.extra_info["records_per_s"] = N_RECORDS / seconds
        print(f"\nFinetuneDataset: {N_RECORDS} records in {seconds:.2f} s "
              f"({N_RECORDS / seconds:,.0f} records/s, {int(dataset.lengths.sum()):,} tokens)")


@pytest.mark.parametrize("grouped", [False, True])
def test_loader_epoch(benchmark, records, tokenizer, grouped):
    dataset = FinetuneDataset(records, tokenizer, max_length=256)
    loader = DataLoader(dataset, 16, seed=0, group_by_length=grouped)

    def epoch():
        pad = real = 0
        for batch in loader.iter_epoch(0):
            real += int(batch["attention_mask"].sum())
            pad += batch["attention_mask"].size
        return real, pad - real

    real, padding = benchmark.pedantic(epoch, rounds=3, iterations=1)
    assert real == int(dataset.lengths.sum())
    benchmark.extra_info.update({"batches": len(loader), "padding_fraction": padding / (real + padding)})
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        seconds = float(stats.stats.median)
        print(f"\nDataLoader epoch (group_by_length={grouped}): {len(loader)} batches in "
              f"{seconds * 1e3:.0f} ms ({len(loader) / seconds:,.0f} batches/s); padding "
              f"{100 * padding / (real + padding):.1f}% of positions")
