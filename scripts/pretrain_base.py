"""Pretrain the tiny base GPT that `fastlora demo` fine-tunes, on the tasks' prose corpus.

    python scripts/pretrain_base.py [--steps 4000] [--documents 200000] [--resume]

It takes about 12 minutes on 2 cores. A checkpoint is written to build/pretrain_base/ every 200
steps and on Ctrl-C; --resume continues from it, to the same weights as an unbroken run.

Writes fastlora/assets/tokenizer.json (BPE, 512 tokens, trained on the bundled corpus.txt) and
fastlora/assets/base.safetensors (+ .json config): a plain language model of the prose corpus,
`make_corpus(documents, CORPUS_SEED)`, whose first 20,000 documents are corpus.txt. It has never
seen the instruction format, so fine-tuning has something to teach.

Why 200,000 documents when the tokenizer needs 20,000: pretrained for 17 epochs on the 20,000
alone (the earlier base), the model memorised their facts instead of learning the skills. Asked
in prose to reverse new words, it lost 1.14 nats per answer token, so fine-tuning had to teach
the skill itself, which full fine-tuning did far better than a rank-8 LoRA (eval loss 1.5x).
On fresh facts (2.8 epochs of 200,000 documents) it learns the skills, at 0.08 nats per answer
token for reversing, 0.17 for sorting and 0.02 for capitalising, so fine-tuning mostly teaches
the instruction format, where a rank-8 LoRA matches full fine-tuning (tests/test_quality.py).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastlora as fl  # noqa: E402
from fastlora.data import load_records  # noqa: E402
from fastlora.tasks import CORPUS_DOCUMENTS, CORPUS_SEED, make_corpus  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fastlora", "assets")
BASE_CONFIG = dict(vocab_size=512, embed_dim=256, num_heads=4, num_layers=2, max_seq_len=128)


class ChunkDataset:
    """The corpus as (input_ids, labels) chunks of `length` tokens, every token trained on."""

    def __init__(self, ids, length):
        n = len(ids) // length
        self.chunks = np.asarray(ids[: n * length], dtype=np.int64).reshape(n, length)

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        row = self.chunks[i].tolist()
        return {"input_ids": row, "labels": row}


def corpus_documents(corpus):
    """The corpus's documents (separated by blank lines), each ending in a newline."""
    return [doc.strip("\n") + "\n" for doc in corpus.split("\n\n") if doc.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--documents", type=int, default=200000, help="pretraining corpus size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=ASSETS)
    parser.add_argument("--checkpoint-dir", default=os.path.join("build", "pretrain_base"))
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    args = parser.parse_args(argv)
    if args.documents < CORPUS_DOCUMENTS:
        parser.error(f"--documents must be at least {CORPUS_DOCUMENTS:,} (corpus.txt is their head), got {args.documents}")

    with open(os.path.join(ASSETS, "corpus.txt"), encoding="utf-8") as fh:
        corpus = fh.read()
    pretraining_text = make_corpus(args.documents, seed=CORPUS_SEED)
    if not pretraining_text.startswith(corpus.rstrip("\n")):
        raise SystemExit("corpus.txt is not the head of make_corpus(documents, CORPUS_SEED); "
                         "rerun scripts/make_data.py first")
    started = time.perf_counter()
    # the tokenizer comes from the pretraining text alone, as a real base model's does: the
    # instruction template is then spelled with pieces the model has seen in the corpus
    tokenizer = fl.BPETokenizer.train([corpus], vocab_size=BASE_CONFIG["vocab_size"])
    formatter = fl.InstructionFormatter()
    record = load_records(os.path.join(ASSETS, "instructions_train.json"))[0]
    sample = formatter.format(record["instruction"], record["input"], record["output"])
    if tokenizer.decode(tokenizer.encode(sample)) != sample:
        raise SystemExit(f"the corpus lacks characters of the instruction data: {sample!r}")
    print(f"tokenizer: {tokenizer.vocab_size} tokens in {time.perf_counter() - started:.1f}s")

    eos = tokenizer.eos_token_id
    ids = []
    for document in corpus_documents(pretraining_text):
        ids.extend(tokenizer.encode(document))
        ids.append(eos)
    data = ChunkDataset(ids, BASE_CONFIG["max_seq_len"])
    print(f"corpus: {len(ids):,} tokens, {len(data)} chunks of {BASE_CONFIG['max_seq_len']}")

    model = fl.GPT(**BASE_CONFIG, seed=0)
    optimizer = fl.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    epochs = -(-args.steps * args.batch_size // len(data))
    trainer = fl.Trainer(model, optimizer, data, batch_size=args.batch_size, epochs=epochs, max_steps=args.steps,
                         warmup_ratio=0.05, min_lr_ratio=0.1, seed=0, checkpoint_dir=args.checkpoint_dir,
                         save_every=200)
    if args.resume:
        if not os.path.exists(trainer.default_checkpoint_path()):
            raise SystemExit(f"--resume: no checkpoint at {trainer.default_checkpoint_path()}")
        trainer.load_checkpoint(trainer.default_checkpoint_path())
        print(f"resumed at step {trainer.step} of {trainer.total_steps}")
    try:
        losses = trainer.train()
    except KeyboardInterrupt:  # the trainer has saved the checkpoint and said where
        raise SystemExit("interrupted; run again with --resume to continue") from None
    print(f"pretrained {len(losses)} steps in {time.perf_counter() - started:.0f}s: "
          f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")

    os.makedirs(args.out, exist_ok=True)
    tokenizer.save(os.path.join(args.out, "tokenizer.json"))
    model.save(os.path.join(args.out, "base.safetensors"), dtype=np.float16)
    print("wrote", os.path.join(args.out, "tokenizer.json"), os.path.join(args.out, "base.safetensors"))


if __name__ == "__main__":
    main()
