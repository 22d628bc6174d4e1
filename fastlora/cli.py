"""The `fastlora` command.

  fastlora demo                                  base vs full fine-tuning vs LoRA vs QLoRA on the bundled tasks
  fastlora train --data my.json --out DIR        fine-tune (fully, or with --lora-rank R) on your data
  fastlora eval --data eval.json [--adapter DIR] loss, perplexity, accuracy, exact match
  fastlora generate --instruction "..."          answer an instruction with a model (+ adapter)
  fastlora export --model DIR --adapter A --out OUT   merge an adapter into a Hugging Face model folder

--data takes Alpaca ({"instruction", "input", "output"}), chat ({"messages": [{"role", "content"}]}),
ShareGPT ({"conversations": [{"from", "value"}]}) or {"text"} records from .json, .jsonl or .parquet;
--field-map instruction=question,output=answer reads other field names; --truncation says how a
record longer than --max-length is cut. generate samples with --temperature, --top-k, --top-p and
--repetition-penalty, and stops at eos, at --stop text, and at a chat template's end-of-turn.

--model takes a Hugging Face model folder (GPT-2: config.json + model.safetensors) or a model
fastlora saved; its tokenizer comes from the same folder unless --tokenizer is given. Without
--model/--tokenizer the bundled base GPT and tokenizer are used: a toy that knows only the
bundled tasks (fine-tune it, or bring your own model).

Flags take Hugging Face's names too (--output-dir, --learning-rate, --num-train-epochs,
--gradient-accumulation-steps, --lora-r, ...; underscores or dashes), are never abbreviated, and
a misspelt one is refused with the closest match. `fastlora COMMAND -h` lists every option and
its default; `python -m fastlora` is the same command.

Errors: fastlora's own error family (FastloraError: a bad file, flag or output folder, and a
run that diverged) and the operating system's file errors print one line naming the file or
flag and exit with 2; argparse's own errors exit with 2 too. Anything else is a bug in
fastlora and keeps its traceback. `train` refuses an --out that holds an earlier run unless
given --resume or --overwrite, checks --out writable and locks it before loading anything.

`mpiexec -n N fastlora train ...` trains data-parallel over N processes (fastlora[mpi]; the README's
"More than one machine"): --batch-size is then the global batch, rank 0 alone prints and writes,
and a rank that fails ends the job with one line naming it.
"""
import contextlib
import json
import os
import sys

import numpy as np

from fastlora import __version__, _argparse
from fastlora.defaults import EPOCHS, LORA_TARGETS, LR_FULL, LR_LORA, WEIGHT_DECAY
from fastlora.errors import FastloraError, naming

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C


@contextlib.contextmanager
def _about(where):
    """A ValueError (how fastlora's readers and checks refuse input) or RecursionError (JSON nested
    too deeply) raised while reading the file or using the flag `where` becomes one FastloraError
    naming it. Other exceptions are bugs and pass through with their tracebacks."""
    try:
        yield
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, FastloraError) and str(where) in str(exc):
            raise
        raise FastloraError(naming(where, exc)) from None


def _check_sidecar(path):
    """A model fastlora saved (weights + .json sidecar): the sidecar's sizes must match the weights'
    header before GPT.load builds the model, which would otherwise allocate whatever it says."""
    from fastlora.io import read_json, safetensors_header
    weights = path if os.path.isfile(path) else os.path.join(path, "model.safetensors")
    sidecar = weights + ".json"
    if not os.path.isfile(weights) or not os.path.isfile(sidecar) or \
            (os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))):
        return  # a Hugging Face folder, or nothing there: from_pretrained says what is wrong
    cfg = read_json(sidecar)
    if not isinstance(cfg, dict):
        return
    shapes = {k: tuple(e["shape"]) for k, e in safetensors_header(weights)[0].items()}
    dim = cfg.get("embed_dim")
    hidden = cfg.get("mlp_hidden") or (cfg.get("mlp_ratio", 4) * dim if isinstance(dim, int) else None)
    expected = {"embed.weight": (cfg.get("vocab_size"), dim), "pos_embed.weight": (cfg.get("max_seq_len"), dim),
                "blocks.0.mlp.fc1.weight": (hidden, dim)}
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise FastloraError(f"{sidecar}: its sizes make {name} {shape}, but {weights} holds "
                                f"{shapes.get(name, 'no such tensor')}")
    layers = {k.split(".")[1] for k in shapes if k.startswith("blocks.")}
    if cfg.get("num_layers") != len(layers):
        raise FastloraError(f"{sidecar}: num_layers is {cfg.get('num_layers')!r}, but {weights} holds "
                            f"{len(layers)} blocks")


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
        raise FastloraError(f"--model {args.model}: no tokenizer found beside the model ({exc}); pass "
                            "--tokenizer") from None
    return args.model


def _load_model_and_tokenizer(args):
    from fastlora import assets
    model = _load_model(args.model or assets.BASE_MODEL)
    tokenizer, tokenizer_path = _load_tokenizer(args, model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise FastloraError(f"{tokenizer_path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {model.config.vocab_size}")
    if getattr(args, "adapter", None):
        from fastlora.lora import LoRAModel
        with _about(args.adapter):
            model = LoRAModel.from_pretrained(model, args.adapter)
    return model, tokenizer


def _load_tokenizer(args, model):
    """(tokenizer, where it came from) for `model` (see _tokenizer_path)."""
    from fastlora.data import load_tokenizer
    path = _tokenizer_path(args, model)
    with _about(path):
        return load_tokenizer(path), path


def _load_model(path):
    from fastlora.nn.pretrained import from_pretrained
    _check_is_model(path)
    with _about(path):
        _check_sidecar(path)
        return from_pretrained(path)


def _check_is_model(path):
    """--model names a model folder or a .safetensors model file, or says what it is instead."""
    what = ("a Hugging Face model folder (config.json + model.safetensors) or a model fastlora saved "
            "(.safetensors with its .json beside it)")
    if not os.path.exists(path):
        raise FastloraError(f"--model {path}: no such file or folder; give {what}")
    if os.path.isfile(path) and not path.lower().endswith(".safetensors"):
        kind = "a dataset" if path.lower().endswith((".json", ".jsonl", ".parquet")) else "not a model file"
        raise FastloraError(f"--model {path}: {kind}; --model takes {what} (training data goes in --data)")


def _dataset(path, tokenizer, model, args):
    from fastlora.data import FinetuneDataset
    from fastlora.data.formats import parse_field_map
    from fastlora.io import check_readable
    cfg = getattr(model, "config", None) or model.base_model.config
    with _about("--field-map"):
        field_map = parse_field_map(args.field_map) if args.field_map else None
    with _about(path):
        if os.path.isfile(path) and path.lower().endswith(".json"):
            # a .json array is read whole: a sparse or huge one is refused first (.jsonl and
            # .parquet stream, a line or a record batch at a time)
            check_readable(path, os.path.getsize(path))
        return FinetuneDataset(path, tokenizer, max_length=min(args.max_length or cfg.max_seq_len, cfg.max_seq_len),
                               field_map=field_map, truncation=args.truncation, packing=args.packing)


def cmd_demo(args):
    from fastlora.demo import run_demo
    run_demo(out_dir=args.out, steps=args.steps, exact_match_limit=args.exact_match_limit)
    return 0


def cmd_train(args):
    from fastlora.train import distributed
    group = distributed.world(required=args.mpi)  # None for one process
    with distributed.guard(group):  # under mpiexec a rank that fails ends the job, naming itself
        return _train_in(args, main=group is None or group.is_main)


def _train_in(args, main):
    from fastlora.train import run_folder
    from fastlora.train.run_folder import CHECKPOINT_NAME
    if args.resume and not os.path.exists(os.path.join(args.out, CHECKPOINT_NAME)):
        raise FastloraError(f"--resume: no checkpoint at {os.path.join(args.out, CHECKPOINT_NAME)}")
    if not main:  # rank 0 alone holds --out, prints and writes
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return _train(args, main)
    with run_folder.hold(args.out):  # checked writable and locked before anything is loaded
        removed = run_folder.prepare(args.out, resume=args.resume, overwrite=args.overwrite)
        if removed:
            print(f"removed {len(removed)} unfinished file(s) that killed saves left in {args.out}", file=sys.stderr)
        return _train(args, main)


def _train(args, main=True):
    from fastlora import assets
    from fastlora.io import atomic_write
    from fastlora.optim import AdamW
    from fastlora.train import Trainer, run_folder
    model, tokenizer = _load_model_and_tokenizer(args)
    train_ds = _dataset(args.data, tokenizer, model, args)
    eval_ds = _dataset(args.eval_data, tokenizer, model, args) if args.eval_data else None
    hf_model = model.hf_config is not None
    run_folder.check_writable(args.out, ["adapter"] if args.lora_rank else ["model"] if hf_model else [])
    if args.lora_rank:
        from fastlora.lora import LoRAModel
        with _about("--lora-rank/--lora-alpha/--lora-targets/--lora-dropout"):
            model = LoRAModel(model, target_modules=args.lora_targets.split(","), rank=args.lora_rank,
                              alpha=args.lora_alpha, dropout=args.lora_dropout,
                              base_model_name_or_path=os.path.abspath(args.model) if hf_model else None)
            model.inject_lora()
        params = model.lora_parameters()
        print(f"LoRA: {model.trainable_percentage():.2f}% of {model.num_parameters():,} parameters trainable")
    else:
        params = list(model.parameters())
    if args.gradient_checkpointing:  # each block's activations recomputed in the backward pass
        model.gradient_checkpointing_enable()
    lr = args.lr if args.lr is not None else (LR_LORA if args.lora_rank else LR_FULL)
    with _about("--lr/--weight-decay"):
        optimizer = AdamW(params, lr=lr, weight_decay=args.weight_decay)
    trainer = Trainer(model, optimizer, train_ds,
                      batch_size=args.batch_size, epochs=args.epochs, eval_dataset=eval_ds,
                      grad_accum_steps=args.grad_accum, max_steps=args.max_steps, seed=args.seed,
                      checkpoint_dir=args.out, save_every=args.save_every,
                      eval_every=args.eval_every, logging_steps=args.logging_steps,
                      distributed=True if args.mpi else None)
    checkpoint = trainer.default_checkpoint_path()
    if args.resume:
        trainer.load_checkpoint(checkpoint, allow_changes=args.allow_changes)
        print(f"resumed from {checkpoint} at step {trainer.step} of {trainer.total_steps}")
    from fastlora.progress import format_metrics
    trainer.train()
    if not main:
        return 0
    print(format_metrics(trainer.metrics))
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
    ds = _dataset(args.data, tokenizer, model, args)
    with _about("--exact-match-limit"):
        benchmark = Benchmark(eval_dataset=ds, exact_match_limit=args.exact_match_limit, progress=True)
    result = benchmark.evaluate(model)
    print(format_table({os.path.basename(args.adapter or args.model or "bundled base"): result}))
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_generate(args):
    from fastlora.data import InstructionFormatter
    from fastlora.data.examples import ExampleEncoder
    model, tokenizer = _load_model_and_tokenizer(args)
    stops = list(args.stop or [])
    if args.chat or getattr(tokenizer, "chat_template", None):
        # a chat model is asked in its own template (ChatML without one) and stops at its end-of-turn
        question = args.instruction + (f"\n\n{args.input}" if args.input else "")
        ask = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]}
        with _about(args.tokenizer or args.model or "the tokenizer's chat template"):
            ids, _, end_of_turn = ExampleEncoder(tokenizer, InstructionFormatter()).prompt_and_reference(ask)
        stops += end_of_turn
    else:
        ids = np.asarray(list(tokenizer.encode(InstructionFormatter().prompt(args.instruction, args.input))),
                         dtype=np.int64)
    # an end-of-turn that is one token (a special token) stops like eos
    eos = [tokenizer.eos_token_id] + [t[0] for t in (_one_token(tokenizer, s) for s in stops) if t]
    with _about("--max-new-tokens/--temperature/--top-k/--top-p/--repetition-penalty/--stop"):
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                             eos_token_id=eos, stop_strings=stops or None, tokenizer=tokenizer, seed=args.seed)
    new = [int(t) for t in out[len(ids):]]
    ends = [k for k, t in enumerate(new) if t in eos]
    text = tokenizer.decode(new[: ends[0]] if ends else new)
    for stop in stops:
        text = text.split(stop, 1)[0]
    print(text)
    if not text.strip():
        why = "it ended the answer at once" if ends and ends[0] == 0 else f"{len(new)} token(s) of blank text"
        hint = (" The bundled base is a toy that knows only the bundled tasks' prose, not how to answer: "
                "fine-tune it first (fastlora demo, or fastlora train) and pass --adapter or --model."
                if not args.model and not args.adapter else "")
        print(f"fastlora generate: the model produced no answer ({why}).{hint}", file=sys.stderr)
    return 0


def _one_token(tokenizer, text):
    """[id] when `text` is one token (special-token text read as the token), else None."""
    try:
        ids = list(tokenizer.encode(text, allowed_special=True))
    except (TypeError, ValueError):
        return None
    return ids if len(ids) == 1 else None


def cmd_export(args):
    from fastlora.lora import LoRAModel
    model = _load_model(args.model)
    tokenizer, _ = _load_tokenizer(args, model)
    hf_tokenizer = tokenizer if hasattr(tokenizer, "save_pretrained") else None
    with _about(args.adapter):
        merged = LoRAModel.from_pretrained(model, args.adapter).merge_and_unload()
    with _about(args.out):
        folder = merged.save_pretrained(args.out, tokenizer=hf_tokenizer)
    print(f"merged model written to {folder} (Hugging Face layout: transformers loads it with "
          "AutoModelForCausalLM.from_pretrained)")
    if hf_tokenizer is None:
        print("its tokenizer is fastlora's own format, which transformers cannot read, so it was not written")
    return 0


def _model_flags(p):
    p.add_argument("--model", metavar="PATH", help="a Hugging Face model folder (config.json + model.safetensors) or a "
                                   "model fastlora saved; default: the bundled base (a toy that knows only the "
                                   "bundled tasks)")
    p.add_argument("--tokenizer", metavar="PATH", help="a tokenizer folder or file (Hugging Face or fastlora JSON); default: "
                                       "the one beside --model, else the bundled tokenizer")


def _data_flags(p):
    p.add_argument("--field-map", metavar="OURS=YOURS,...",
                   help="your dataset's names for the fields, e.g. instruction=question,output=answer "
                        "(fields: instruction, input, output, messages, conversations, text, role, content, ...)")
    p.add_argument("--truncation", choices=["keep_response", "drop"], default="keep_response",
                   help="a record longer than --max-length: keep_response keeps up to half for the "
                        "answer and cuts the prompt from its start; drop cuts the end and drops a record "
                        "whose prompt alone fills it")
    p.add_argument("--packing", action="store_true",
                   help="place several records in each --max-length row (attention stays within each record): "
                        "less padding, the same loss")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per record, at most the model's max_seq_len; default: max_seq_len")


DATA_HELP = ("records in .json, .jsonl or .parquet: Alpaca {instruction, input, output}, chat {messages: "
             "[{role, content}]}, ShareGPT {conversations: [{from, value}]} or {text}; --field-map for other names")


def _out_flag(p, what, **kw):
    p.add_argument("--out", "--output-dir", dest="out", metavar="DIR", help=what, **kw)


def build_parser():
    parser = _argparse.ArgumentParser(prog="fastlora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, summary):
        return sub.add_parser(name, help=summary, description=summary)

    demo = command("demo", "base vs full fine-tuning vs LoRA vs QLoRA on the bundled tasks")
    _out_flag(demo, "folder for results.json, the adapter and the loss plot", default="fastlora-demo")
    demo.add_argument("--steps", type=int, default=None, help="training steps per run; default: three epochs, "
                                                              "375 steps")
    demo.add_argument("--exact-match-limit", type=int, default=100, help="eval records to answer by generation")
    demo.set_defaults(func=cmd_demo)

    train = command("train", "fine-tune fully, or a LoRA adapter with --lora-rank, on your records")
    train.add_argument("--data", required=True, metavar="FILE", help="training " + DATA_HELP)
    train.add_argument("--eval-data", metavar="FILE", help="evaluation records, in the same forms as --data")
    _out_flag(train, "folder for the checkpoint and the model or adapter", required=True)
    _model_flags(train)
    _data_flags(train)
    train.add_argument("--lora-rank", "--lora-r", dest="lora_rank", type=int, default=0, metavar="R",
                       help="train a LoRA adapter of this rank (0: fine-tune every weight)")
    train.add_argument("--lora-alpha", type=float, default=None,
                       help="LoRA scaling is alpha / rank; default: alpha = rank (as LoRAModel and PEFT's ratio)")
    train.add_argument("--lora-targets", "--target-modules", dest="lora_targets", default=",".join(LORA_TARGETS),
                       metavar="NAMES",
                       help="modules to adapt: comma-separated names (q_proj,v_proj,...), or all-linear")
    train.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    train.add_argument("--epochs", "--num-epochs", "--num-train-epochs", dest="epochs", type=int, default=EPOCHS, metavar="N",
                       help="passes over --data")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    train.add_argument("--batch-size", "--per-device-train-batch-size", dest="batch_size", type=int, default=8, metavar="N",
                       help="records per micro-batch")
    train.add_argument("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=int, default=1, metavar="N",
                       help="micro-batches per optimizer step")
    train.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=None, metavar="LR",
                       help=f"peak learning rate (warm-up, then cosine); default: {LR_FULL:g} full, {LR_LORA:g} LoRA")
    train.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW's decoupled weight decay")
    train.add_argument("--save-every", "--save-steps", dest="save_every", type=int, default=None, metavar="N",
                       help="also checkpoint every N steps (a checkpoint is always written at the end and on Ctrl-C)")
    train.add_argument("--eval-every", "--eval-steps", dest="eval_every", type=int, default=None, metavar="N",
                       help="evaluate on --eval-data every N steps")
    train.add_argument("--logging-steps", type=int, default=None, metavar="N",
                       help="where no terminal shows a progress bar, log a line every N steps; default: every 30 s")
    train.add_argument("--seed", type=int, default=0, help="seed of the data order, initialisation and dropout")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each block's activations in the backward pass: less memory, ~1 more forward")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: continue even though --lr, --weight-decay or the data changed")
    train.add_argument("--overwrite", "--overwrite-output-dir", dest="overwrite", action="store_true",
                       help="replace the run already in --out")
    train.add_argument("--mpi", action="store_true",
                       help="train data-parallel over MPI, as under `mpiexec -n N` it does anyway (needs "
                            "pip install 'fastlora[mpi]'); --batch-size is then the global batch")
    train.set_defaults(func=cmd_train)

    ev = command("eval", "loss, perplexity, accuracy and exact match of a model (and adapter) on records")
    ev.add_argument("--data", required=True, metavar="FILE", help="evaluation " + DATA_HELP)
    _model_flags(ev)
    ev.add_argument("--adapter", help="a LoRA adapter folder (PEFT layout) to put on --model")
    _data_flags(ev)
    ev.add_argument("--exact-match-limit", type=int, default=None,
                    help="answer at most N records by generation for exact match; default: all")
    ev.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    ev.set_defaults(func=cmd_eval)

    gen = command("generate", "answer one instruction")
    gen.add_argument("--instruction", required=True, help="what to do, e.g. \"Add the two numbers.\"")
    gen.add_argument("--input", default="", help="the instruction's input, e.g. \"2 + 3\"")
    _model_flags(gen)
    gen.add_argument("--adapter", help="a LoRA adapter folder (PEFT layout) to put on --model")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="at most this many tokens of answer")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the most likely tokens "
                                                             "whose probabilities sum to P")
    gen.add_argument("--repetition-penalty", type=float, default=None,
                     help="> 1 makes tokens already in the text less likely (transformers' definition)")
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop once the answer contains TEXT "
                                                                     "(repeatable)")
    gen.add_argument("--chat", action="store_true", help="ask in the chat template (ChatML when the "
                                                         "tokenizer has none), as a model trained on chat records expects")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    gen.set_defaults(func=cmd_generate)

    export = command("export", "merge an adapter into its base and write a Hugging Face model folder")
    _model_flags(export)
    export.add_argument("--adapter", required=True, help="a LoRA adapter folder (PEFT layout)")
    _out_flag(export, "folder to write config.json + model.safetensors into", required=True)
    export.set_defaults(func=cmd_export)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)  # unknown or misspelt flags: argparse exits with 2
    try:
        return args.func(args)
    except (FastloraError, OSError) as exc:  # OSError: the system's own word on a file, naming it
        print(f"fastlora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # the trainer has already said where its checkpoint is
        print(f"fastlora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
