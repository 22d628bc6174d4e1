"""Progress of long work: a tqdm.auto bar where someone is watching (a terminal, a notebook), and
plain log lines through fastlora's logger elsewhere (a file, a pipe, CI), so a redirected run is
never silent.

StepProgress follows a training run: on a terminal a bar with loss, lr and tokens/s; elsewhere
one line every `every_steps` steps or `every_seconds` seconds (and at the last step) with step,
loss, lr, tokens/s, elapsed time and ETA; at the end, summary() gives the run's figures in
transformers' and TRL's terms (train_runtime, train_loss, train_tokens_per_second, ...). `bar()`
is the same choice for any other loop (the evaluation's batches): a bar, or one line when done.
"""
import math
import sys
import time

from fastlora.log import get_logger

logger = get_logger(__name__)
EVERY_SECONDS = 30.0  # a log line at least this often when no bar is drawn


def watched(stream=None):
    """True where a bar can be drawn: `stream` (default stderr) is a terminal, or this runs in a
    Jupyter kernel (tqdm.auto then draws a notebook widget)."""
    stream = stream if stream is not None else sys.stderr
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def clock(seconds):
    """'1:02:03' / '2:03' for a number of seconds ('?' when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StepProgress:
    """StepProgress(total, initial=0, desc="train", enabled=True, every_steps=None,
    every_seconds=EVERY_SECONDS). update(step, loss, lr, tokens, seconds) after each step; close().
    enabled=False shows nothing at all."""

    def __init__(self, total, initial=0, desc="train", enabled=True, every_steps=None, every_seconds=EVERY_SECONDS):
        self.total, self.initial, self.desc = total, initial, desc
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.started = self.last_line = time.perf_counter()
        self.steps, self.tokens, self.loss_sum, self.finite_steps = 0, 0, 0.0, 0
        self.window_tokens, self.window_seconds = 0, 0.0  # since the last line: its tokens/s
        self.bar = None
        self.lines = enabled and not watched()
        if enabled and not self.lines:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step, loss, lr, tokens, seconds):
        """Step `step` (1-based, of `total`) is done: its loss, learning rate, tokens and seconds."""
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens
        if math.isfinite(loss):
            self.loss_sum, self.finite_steps = self.loss_sum + loss, self.finite_steps + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
            return
        if not self.lines:
            return
        self.window_tokens, self.window_seconds = self.window_tokens + tokens, self.window_seconds + seconds
        now = time.perf_counter()
        due = (self.every_steps and step % self.every_steps == 0) or now - self.last_line >= self.every_seconds
        if not due and step != self.total:
            return
        tokens_per_s = self.window_tokens / max(self.window_seconds, 1e-9)
        self.last_line, self.window_tokens, self.window_seconds = now, 0, 0.0
        elapsed = now - self.started
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done > 0 else None
        logger.info(f"{self.desc}: step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
                    f"{tokens_per_s:,.0f} tokens/s  elapsed {clock(elapsed)}  ETA {clock(eta)}")

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def summary(self, global_step, epoch, eval_losses=()):
        """The run's figures, named as transformers' Trainer and TRL name them: train_runtime (s),
        train_loss (mean over this run's steps with a finite loss), train_steps_per_second,
        train_tokens_per_second, global_step, epoch, and best_eval_loss / best_eval_step when
        there were evaluations ((step, loss) pairs in eval_losses)."""
        runtime = time.perf_counter() - self.started
        metrics = {"train_runtime": round(runtime, 3),
                   "train_loss": self.loss_sum / self.finite_steps if self.finite_steps else float("nan"),
                   "train_steps_per_second": round(self.steps / max(runtime, 1e-9), 3),
                   "train_tokens_per_second": round(self.tokens / max(runtime, 1e-9), 1),
                   "global_step": global_step, "epoch": round(epoch, 2)}
        finite = [(loss, step) for step, loss in eval_losses if math.isfinite(loss)]
        if finite:
            metrics["best_eval_loss"], metrics["best_eval_step"] = min(finite)
        return metrics


def format_metrics(metrics, split="train"):
    """transformers' log_metrics block: '***** train metrics *****' then one aligned line a figure."""
    width = max(len(k) for k in metrics)
    lines = [f"***** {split} metrics *****"]
    for key, value in metrics.items():
        if key.endswith("_runtime"):
            value = clock(value)
        elif isinstance(value, float):
            value = f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
        lines.append(f"  {key.ljust(width)} = {value:>10}")
    return "\n".join(lines)


def bar(iterable, total=None, desc=None, enabled=True, unit="it"):
    """Iterate over `iterable` with a tqdm.auto bar where watched(); elsewhere one log line when it
    is done (how many `unit`, how long). enabled=False: the iterable as it is."""
    if not enabled:
        yield from iterable
        return
    if watched():
        from tqdm.auto import tqdm
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        return
    started, count = time.perf_counter(), 0
    for item in iterable:
        count += 1
        yield item
    logger.info(f"{desc}: {count} {unit} in {clock(time.perf_counter() - started)}")
