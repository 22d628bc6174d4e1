"""Packing on the bundled data: the share of padding in the batches, and training tokens/s.

    python scripts/measure_packing.py [steps] [bundled|mixed]

The bundled base model and tokenizer, the 2,000 bundled training records, max_length 128 (the
model's), batches of 8 as `fastlora train` makes them. Padding share: pad positions over all
positions of an epoch's batches. Speed: real (non-pad) tokens per second over `steps` full-
fine-tune steps (forward, fused loss, backward, clipping, AdamW) after two warm-up steps,
unpacked and packed, in one process. `mixed` replaces the records by text records of 1 to 20
paragraphs of the bundled corpus (lengths spread out, as real SFT data's are).
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

import fastlora as fl  # noqa: E402
from fastlora import assets  # noqa: E402
from fastlora.data import DataLoader, FinetuneDataset, load_records  # noqa: E402
from fastlora.nn.causal_lm import causal_lm_loss  # noqa: E402


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    tok = fl.load_tokenizer(assets.TOKENIZER)
    folder = os.path.dirname(assets.TOKENIZER)
    if len(sys.argv) > 2 and sys.argv[2] == "mixed":
        with open(os.path.join(folder, "corpus.txt")) as fh:
            paragraphs = fh.read().split("\n\n")
        rng, records, i = np.random.default_rng(0), [], 0
        while len(records) < 2000:
            n = int(rng.integers(1, 21))
            records.append({"text": "\n\n".join(paragraphs[i:i + n])})
            i += n
    else:
        records = load_records(os.path.join(folder, "instructions_train.json"))
    for packing in (False, True):
        ds = FinetuneDataset(records, tok, max_length=128, packing=packing)
        loader = DataLoader(ds, batch_size=8, seed=0)
        batches = list(loader.iter_epoch(0))
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        total = sum(b["attention_mask"].size for b in batches)
        model = fl.GPT.load(assets.BASE_MODEL)
        params = list(model.parameters())
        opt = fl.AdamW(params, lr=1e-4)
        times, tokens = [], 0
        for k, batch in enumerate(batches[: steps + 2]):
            start = time.perf_counter()
            opt.zero_grad()
            loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], position_ids=batch.get("position_ids"))
            loss.backward()
            fl.clip_grad_norm(params, 1.0)
            opt.step()
            if k >= 2:
                times.append(time.perf_counter() - start)
                tokens += int(batch["attention_mask"].sum())
        print(f"packing={packing}: {len(ds)} rows, {len(batches)} batches/epoch, padding {100 * (1 - real / total):.1f}% "
              f"of positions; {tokens / sum(times):,.0f} real tokens/s over {len(times)} steps "
              f"({np.median(times) * 1e3:.0f} ms/step)", flush=True)


if __name__ == "__main__":
    main()
