"""The `fastlora` command.

  fastlora demo                                  base vs full fine-tuning vs LoRA vs QLoRA on the bundled tasks
  fastlora train --data my.json --out DIR        fine-tune (fully, or with --lora-rank R) on your data
  fastlora eval --data eval.json [--adapter DIR] loss, perplexity, accuracy, exact match
  fastlora generate --instruction "..."          answer an instruction with a model (+ adapter)
  fastlora export --model DIR --adapter A --out OUT   merge an adapter into a Hugging Face model folder

--model takes a Hugging Face model folder (GPT-2: config.json + model.safetensors) or a model
fastlora saved; its tokenizer comes from the same folder unless --tokenizer is given. Without
--model/--tokenizer the bundled base GPT and tokenizer are used. Bad input (a missing file, an
unknown flag, a checkpoint for another model) prints one clear line and exits with 2.
"""
import argparse
import json
import os
import sys

import numpy as np

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C


def _tokenizer_path(args, model):
    """--tokenizer, else the tokenizer saved beside a Hugging Face model, else the bundled one."""
    from fastlora import assets
    if args.tokenizer:
        return args.tokenizer
    if model.hf_config is None:
        return assets.TOKENIZER
    from fastlora.data.hf_files import find_tokenizer
    try:
        find_tokenizer(args.model)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"--model {args.model}: no tokenizer found beside the model ({exc}); pass "
                         "--tokenizer") from None
    return args.model


def _load_model_and_tokenizer(args):
    from fastlora import assets
    from fastlora.data import load_tokenizer
    from fastlora.nn.pretrained import from_pretrained
    model = from_pretrained(args.model or assets.BASE_MODEL)
    tokenizer = load_tokenizer(_tokenizer_path(args, model))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    if getattr(args, "adapter", None):
        from fastlora.lora import LoRAModel
        model = LoRAModel.from_pretrained(model, args.adapter)
    return model, tokenizer


def _dataset(path, tokenizer, model, max_length):
    from fastlora.data import FinetuneDataset
    cfg = getattr(model, "config", None) or model.base_model.config
    return FinetuneDataset(path, tokenizer, max_length=min(max_length or cfg.max_seq_len, cfg.max_seq_len))


def cmd_demo(args):
    from fastlora.demo import run_demo
    run_demo(out_dir=args.out, steps=args.steps, exact_match_limit=args.exact_match_limit)
    return 0


def cmd_train(args):
    from fastlora import assets
    from fastlora.io import atomic_write
    from fastlora.optim import AdamW
    from fastlora.train import Trainer
    model, tokenizer = _load_model_and_tokenizer(args)
    train_ds = _dataset(args.data, tokenizer, model, args.max_length)
    eval_ds = _dataset(args.eval_data, tokenizer, model, args.max_length) if args.eval_data else None
    hf_model = model.hf_config is not None
    if args.lora_rank:
        from fastlora.lora import LoRAModel
        model = LoRAModel(model, target_modules=args.lora_targets.split(","), rank=args.lora_rank,
                          alpha=2.0 * args.lora_rank if args.lora_alpha is None else args.lora_alpha,
                          dropout=args.lora_dropout,
                          base_model_name_or_path=os.path.abspath(args.model) if hf_model else None)
        model.inject_lora()
        params = model.lora_parameters()
        print(f"LoRA: {model.trainable_percentage():.2f}% of {model.num_parameters():,} parameters trainable")
    else:
        params = list(model.parameters())
    lr = args.lr if args.lr is not None else (3e-3 if args.lora_rank else 1e-3)
    trainer = Trainer(model, AdamW(params, lr=lr, weight_decay=args.weight_decay), train_ds,
                      batch_size=args.batch_size, epochs=args.epochs, eval_dataset=eval_ds,
                      grad_accum_steps=args.grad_accum, max_steps=args.max_steps, seed=args.seed,
                      checkpoint_dir=args.out, save_every=args.save_every,
                      eval_every=args.eval_every)
    checkpoint = trainer.default_checkpoint_path()
    if args.resume:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        trainer.load_checkpoint(checkpoint)
        print(f"resumed from {checkpoint} at step {trainer.step} of {trainer.total_steps}")
    losses = trainer.train()
    for step, loss in enumerate(losses[-min(len(losses), 10):], start=max(0, len(losses) - 10)):
        print(f"step {step:5d}  loss {loss:.4f}")
    if args.lora_rank:
        folder = model.save_adapter(os.path.join(args.out, "adapter"))
        print(f"adapter written to {folder}")
    elif hf_model:  # a Hugging Face model goes back out as one, its tokenizer beside it
        folder = model.save_pretrained(os.path.join(args.out, "model"), tokenizer=tokenizer)
        print(f"model written to {folder} (Hugging Face layout)")
    else:
        model.save(os.path.join(args.out, "model.safetensors"))
        print(f"model written to {os.path.join(args.out, 'model.safetensors')}")
    source, target = args.tokenizer or assets.TOKENIZER, os.path.join(args.out, "tokenizer.json")
    if hf_model:
        pass  # the tokenizer sits beside the model (full) or the base folder (adapter)
    elif hasattr(tokenizer, "save_pretrained"):  # a Hugging Face tokenizer is a folder of files
        tokenizer.save_pretrained(args.out)
    elif os.path.abspath(source) != os.path.abspath(target):
        with open(source, "rb") as fh:
            blob = fh.read()
        atomic_write(target, lambda out: out.write(blob))
    if eval_ds is not None:
        print(f"eval loss {trainer.evaluate(eval_ds):.4f}")
    return 0


def cmd_eval(args):
    from fastlora.eval import Benchmark, format_table
    model, tokenizer = _load_model_and_tokenizer(args)
    ds = _dataset(args.data, tokenizer, model, args.max_length)
    result = Benchmark(eval_dataset=ds, exact_match_limit=args.exact_match_limit).evaluate(model)
    print(format_table({os.path.basename(args.adapter or args.model or "bundled base"): result}))
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_generate(args):
    from fastlora.data import InstructionFormatter
    model, tokenizer = _load_model_and_tokenizer(args)
    if getattr(tokenizer, "chat_template", None):  # a chat model is asked in its own template
        question = args.instruction + (f"\n\n{args.input}" if args.input else "")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(InstructionFormatter().prompt(args.instruction, args.input))
    ids = np.asarray(list(ids), dtype=np.int64)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, eos_token_id=tokenizer.eos_token_id, seed=args.seed)
    new = [int(t) for t in out[len(ids):]]
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    print(tokenizer.decode(new))
    return 0


def cmd_export(args):
    from fastlora.data import load_tokenizer
    from fastlora.lora import LoRAModel
    from fastlora.nn.pretrained import from_pretrained
    model = from_pretrained(args.model)
    tokenizer = load_tokenizer(_tokenizer_path(args, model))
    hf_tokenizer = tokenizer if hasattr(tokenizer, "save_pretrained") else None
    merged = LoRAModel.from_pretrained(model, args.adapter).merge_and_unload()
    folder = merged.save_pretrained(args.out, tokenizer=hf_tokenizer)
    print(f"merged model written to {folder} (Hugging Face layout: transformers loads it with "
          "AutoModelForCausalLM.from_pretrained)")
    if hf_tokenizer is None:
        print("its tokenizer is fastlora's own format, which transformers cannot read, so it was not written")
    return 0


def _model_flags(p):
    p.add_argument("--model", help="a Hugging Face model folder (config.json + model.safetensors) or a "
                                   "model fastlora saved; default: the bundled base")
    p.add_argument("--tokenizer", help="a tokenizer folder or file (Hugging Face or fastlora JSON); default: "
                                       "the one beside --model, else the bundled tokenizer")


def build_parser():
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="base vs full fine-tuning vs LoRA vs QLoRA on the bundled tasks")
    demo.add_argument("--out", default="fastlora-demo", help="folder for results.json, adapter, plot")
    demo.add_argument("--steps", type=int, default=None, help="training steps per run (default: three epochs, 375 steps)")
    demo.add_argument("--exact-match-limit", type=int, default=100, help="eval records to generate for")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="fine-tune on an Alpaca-format .json/.jsonl file")
    train.add_argument("--data", required=True)
    train.add_argument("--eval-data")
    train.add_argument("--out", required=True, help="folder for checkpoint, model or adapter")
    _model_flags(train)
    train.add_argument("--lora-rank", type=int, default=0, help="train a LoRA adapter of this rank (0: full)")
    train.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * rank")
    train.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated, or all-linear")
    train.add_argument("--lora-dropout", type=float, default=0.0)
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=None, help="default: 1e-3 full, 3e-3 LoRA")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--max-length", type=int, default=None, help="default: the model's max_seq_len")
    train.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    train.add_argument("--eval-every", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model (and adapter) on a dataset")
    ev.add_argument("--data", required=True)
    _model_flags(ev)
    ev.add_argument("--adapter", help="a LoRA adapter folder (PEFT layout)")
    ev.add_argument("--max-length", type=int, default=None)
    ev.add_argument("--exact-match-limit", type=int, default=None)
    ev.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="answer one instruction")
    gen.add_argument("--instruction", required=True)
    gen.add_argument("--input", default="")
    _model_flags(gen)
    gen.add_argument("--adapter")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    export = sub.add_parser("export", help="merge an adapter into its base and write a Hugging Face model folder")
    _model_flags(export)
    export.add_argument("--adapter", required=True, help="a LoRA adapter folder (PEFT layout)")
    export.add_argument("--out", required=True, help="folder to write config.json + model.safetensors into")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)  # unknown flags: argparse exits with 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, KeyError) as exc:  # OSError: missing or unreadable files
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fastlora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # the trainer has already said where its checkpoint is
        print(f"fastlora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
