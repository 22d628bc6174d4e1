"""Fitting an example into max_length tokens without losing its answer.

An example is split where its response starts: the start of its last run of scored tokens
(an Alpaca record's output, a conversation's last assistant turn; a text record is all
response). Then, for a budget of max_length tokens:

  "keep_response" (the default)   the response keeps what it needs, up to half the budget,
        or more where the prompt is shorter than its half; the prompt keeps the rest and is
        cut from its start, so what the model reads just before its answer (the response
        header, the last question) stays. LLaMA-Factory's infer_seqlen is the anchor; two
        differences: when both are long the response gets half (infer_seqlen splits in
        proportion to their lengths), and the prompt loses its start (infer_seqlen cuts a
        source at its end, which would part the answer from the header before it).
        The response is cut at its end.
  "drop"   today's behaviour: the example is cut at its end; one whose prompt alone fills
        max_length would keep no response token and is dropped (the dataset warns).

No example ever ends up with nothing scored: the response keeps at least one token.
"""
import numpy as np

MODES = ("keep_response", "drop")


def check_mode(truncation):
    if truncation not in MODES:
        raise ValueError(f"truncation must be one of {list(MODES)}, got {truncation!r}")
    return truncation


def response_start(scored):
    """Index of the first token of the last run of scored tokens (len if none is scored)."""
    scored = np.asarray(scored, dtype=bool)
    hits = np.flatnonzero(scored)
    if hits.size == 0:
        return len(scored)
    before = np.flatnonzero(~scored[:hits[-1]])
    return int(before[-1]) + 1 if before.size else 0


def response_starts(scored, offsets):
    """response_start of each example r = scored[offsets[r]:offsets[r + 1]] (none empty), at once."""
    scored = np.asarray(scored, dtype=bool)
    first = offsets[:-1]
    pos = np.arange(len(scored))
    example = np.repeat(np.arange(len(first)), np.diff(offsets))
    last_scored = np.maximum.reduceat(np.where(scored, pos, -1), first)
    gap = np.maximum.reduceat(np.where(~scored & (pos < last_scored[example]), pos, -1), first)
    return np.where(gap >= 0, gap + 1, first) - first


def budget_split(prompt_len, response_len, max_length):
    """(prompt tokens kept, response tokens kept) under "keep_response"."""
    if prompt_len + response_len <= max_length:
        return prompt_len, response_len
    response = min(response_len, max(max_length // 2, max_length - prompt_len))
    return min(prompt_len, max_length - response), response


def truncate(ids, scored, max_length, mode):
    """-> (ids, scored) of at most max_length tokens, or None where "drop" drops the example."""
    n = len(ids)
    if n <= max_length:
        return ids, scored
    cut = response_start(scored)
    if mode == "drop":
        if cut >= max_length:
            return None
        return ids[:max_length], scored[:max_length]
    p, r = budget_split(cut, n - cut, max_length)
    keep = slice(cut - p, cut + r)
    return ids[keep], scored[keep]
