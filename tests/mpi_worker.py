"""One data-parallel training run, for tests/test_distributed.py: under `mpiexec -n N python
tests/mpi_worker.py CONFIG_JSON`, or called in-process as run(config) for the one-process reference.

config keys: out (folder; each rank writes rank<r>.npz: losses, trainable weights, optimizer
buffers), kind (full, lora, qlora), dtype, steps, batch_size, grad_accum, lr, checkpoint_dir,
save_every, resume, distributed, dropout (model's and LoRA's); and for the fault tests: fault ({"rank", "step", "how": kill |
raise}), differ ("seed" or "data": rank 1 starts unlike rank 0).
"""
import json
import os
import signal
import sys

import numpy as np

import fastlora as fl
from fastlora.data import CharTokenizer, FinetuneDataset, InstructionFormatter
from fastlora.tasks import make_examples


def build(config, rank=0):
    """(trainer, model) for `config`, as every rank builds it (rank matters only for `differ`)."""
    records = make_examples(40 if config.get("differ") == "data" and rank == 1 else 36, seed=0)
    fmt = InstructionFormatter()
    tok = CharTokenizer.from_texts([fmt.format(r["instruction"], r["input"], r["output"]) for r in make_examples(36)])
    dataset = FinetuneDataset(records, tok, max_length=64)
    dtype = np.dtype(config.get("dtype", "float32"))
    dropout = config.get("dropout", 0.0)
    model = fl.GPT(vocab_size=tok.vocab_size, embed_dim=64, num_heads=4, num_layers=2, max_seq_len=64,
                   seed=0, dtype=dtype, dropout=dropout)
    kind = config.get("kind", "full")
    if kind == "lora":
        model = fl.LoRAModel(model, target_modules=["q_proj", "v_proj"], rank=4, alpha=8,
                             dropout=dropout).inject_lora()
        params = model.lora_parameters()
    elif kind == "qlora":
        model = fl.apply_qlora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
        params = fl.get_qlora_parameters(model)
    else:
        params = list(model.parameters())
    seed = config.get("seed", 0) + (1 if config.get("differ") == "seed" and rank == 1 else 0)
    trainer = fl.Trainer(model, fl.AdamW(params, lr=config.get("lr", 3e-3), weight_decay=0.01), dataset,
                         batch_size=config.get("batch_size", 8), grad_accum_steps=config.get("grad_accum", 1),
                         epochs=100, max_steps=config.get("steps", 4), warmup_ratio=0.0, min_lr_ratio=1.0, seed=seed,
                         progress=False, checkpoint_dir=config.get("checkpoint_dir"),
                         save_every=config.get("save_every"), distributed=config.get("distributed"))
    return trainer, model


def run(config):
    from fastlora.train import distributed
    group = distributed.world() if config.get("distributed") is not False else None
    rank = group.rank if group else 0
    trainer, model = build(config, rank)
    if config.get("resume"):
        trainer.load_checkpoint(os.path.join(config["checkpoint_dir"], "checkpoint.safetensors"))
    fault = config.get("fault")
    if fault and fault["rank"] == rank:
        step = trainer._train_step

        def faulty(group_, position):
            if trainer.step == fault["step"]:
                if fault["how"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault at step {trainer.step}")
            return step(group_, position)
        trainer._train_step = faulty
    losses = trainer.train()
    trained = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    _, buffers = fl.optim.split_state(trainer.optimizer.state_dict())
    out = config["out"]
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"rank{rank}.npz"), losses=np.array(losses),
             **{f"param/{k}": v for k, v in trained.items()}, **{f"optim/{k}": v for k, v in buffers.items()},
             allreduce_seconds=getattr(group, "allreduce_seconds", 0.0))
    return losses


if __name__ == "__main__":
    try:
        run(json.loads(sys.argv[1]))
    except KeyboardInterrupt:  # every rank stops together, the checkpoint written
        sys.exit(130)
