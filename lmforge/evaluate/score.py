"""Scoring continuations: log P(continuation | context) and whether greedy decoding produces it.

A request is one context and one or more continuations (the choices of a multiple-choice item,
or the single target of a cloze item). For each continuation we want the sum of its tokens'
log-probabilities and whether every one of its tokens is the argmax (lm-evaluation-harness's
`loglikelihood`: (logprob, is_greedy)).

Two scorers, which must agree (tests/test_eval.py, benchmarks/eval.py):

- `score_naive`: one forward per continuation over context + continuation, batch size 1. Simple,
  obviously right, and slow: a 4-choice item encodes its context 4 times.
- `score_packed`: each item becomes ONE row: the context followed by every continuation, with RoPE
  positions that restart at len(context) for each continuation and a block attention mask:

      row       c c c c | a a | b b b | d        (context, then choices a, b, d)
      position  0 1 2 3 | 4 5 | 4 5 6 | 4
      a token sees the context causally and the earlier tokens of its own choice, nothing else

  so the context is encoded once, and each choice's first token is predicted from the context's
  last position, shared by all choices. Rows are sorted by length (longest first, so a batch that
  does not fit in memory fails at once) and batched across items with padding only up to the
  longest row of each batch (dynamic padding). Log-softmax is taken only at the scored positions.

Truncation is decided once per request (`make_request`), before either scorer sees it: the
context keeps its last tokens so that context + the longest continuation fits in max_seq_len. A
row holds as many continuations as fit in max_seq_len tokens; the rest go to further rows that
repeat the context.

Trade-off: packing needs a dense (B, T, T) boolean mask, so attention runs the SDPA kernel with an
explicit mask instead of the causal flash path; for the short rows of evaluation tasks that is far
cheaper than re-encoding the context per choice. KV-cache reuse would avoid the mask but cannot
batch items whose contexts differ in length without per-row cache positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DataError


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # non-empty, already truncated
    continuations: tuple[tuple[int, ...], ...]  # each non-empty


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation's token log-probabilities (natural log)
    greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int


def make_request(context: list[int], continuations: list[list[int]], max_len: int, where: str = "") -> Request:
    """Truncate the context from the left so that context + the longest continuation fits."""
    if not context:
        raise DataError(f"{where}: empty context (use tasks.context_ids, which substitutes EOS)")
    longest = max(len(c) for c in continuations)
    if min(len(c) for c in continuations) == 0:
        raise DataError(f"{where}: a continuation encodes to no tokens")
    if longest >= max_len:
        raise DataError(f"{where}: a continuation of {longest} tokens leaves no room for context "
                        f"in model.max_seq_len ({max_len}); shorten it")
    keep = max_len - longest
    return Request(tuple(context[-keep:]), tuple(tuple(c) for c in continuations))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _gather(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), targets (N,) -> (log-probs (N,), is-argmax (N,)) in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, targets[:, None])[:, 0], logits.argmax(dim=-1) == targets


@torch.no_grad()
def score_naive(model: torch.nn.Module, requests: list[Request]) -> list[list[Score]]:
    """The reference: one forward (batch 1) per continuation over context + continuation[:-1]."""
    dev = _device(model)
    out: list[list[Score]] = []
    for r in requests:
        scores = []
        for cont in r.continuations:
            ids = torch.tensor([list(r.context) + list(cont[:-1])], device=dev)  # (1, Lc + l - 1)
            logits = model(ids)[0]  # (Lc + l - 1, V)
            first = len(r.context) - 1  # the last context position predicts the first token
            lp, hit = _gather(logits[first : first + len(cont)], torch.tensor(cont, device=dev))
            scores.append(Score(float(lp.sum()), bool(hit.all()), len(cont)))
        out.append(scores)
    return out


@dataclass
class _Row:
    request: int  # index into requests
    choices: list[int]  # indices into request.continuations, in row order
    length: int  # tokens in the row


def _rows(requests: list[Request], max_len: int) -> list[_Row]:
    """Pack each request's continuations after its context, opening a new row when full."""
    rows: list[_Row] = []
    for i, r in enumerate(requests):
        row = _Row(i, [], len(r.context))
        for j, c in enumerate(r.continuations):
            if row.choices and row.length + len(c) > max_len:
                rows.append(row)
                row = _Row(i, [], len(r.context))
            row.choices.append(j)
            row.length += len(c)
        rows.append(row)
    return rows


@torch.no_grad()
def score_packed(model: torch.nn.Module, requests: list[Request], *, batch_size: int = 8) -> list[list[Score]]:
    """The fast scorer (see the module docstring); returns the same numbers as score_naive."""
    dev = _device(model)
    max_len = model.cfg.max_seq_len
    rows = sorted(_rows(requests, max_len), key=lambda row: -row.length)
    result: dict[tuple[int, int], Score] = {}
    for b0 in range(0, len(rows), batch_size):
        batch = rows[b0 : b0 + batch_size]
        B, L = len(batch), batch[0].length  # sorted: the first row is the longest
        idx = torch.zeros(B, L, dtype=torch.long)
        pos = torch.zeros(B, L, dtype=torch.long)
        seg = torch.full((B, L), -1, dtype=torch.long)  # 0 context, k + 1 the k-th choice, -1 padding
        where_b, where_t, targets, owner = [], [], [], []  # scored positions, their targets, (row, choice)
        for b, row in enumerate(batch):
            r = requests[row.request]
            Lc = len(r.context)
            idx[b, :Lc] = torch.tensor(r.context)
            pos[b, :Lc] = torch.arange(Lc)
            seg[b, :Lc] = 0
            s = Lc
            for k, j in enumerate(row.choices):
                c = r.continuations[j]
                n = len(c)
                idx[b, s : s + n] = torch.tensor(c)
                pos[b, s : s + n] = torch.arange(Lc, Lc + n)
                seg[b, s : s + n] = k + 1
                # token 0 is predicted at the context's last slot, token t > 0 at slot s + t - 1
                where_t.extend([Lc - 1] + list(range(s, s + n - 1)))
                where_b.extend([b] * n)
                targets.extend(c)
                owner.extend([(b, j)] * n)
                s += n
        # (B, T, T): query q may see key k when k is not later and k is context or q's own choice;
        # padding (seg -1, position 0) sees the first slot, so no row of the mask is empty.
        mask = (pos[:, None, :] <= pos[:, :, None]) & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
        logits = model(idx.to(dev), positions=pos.to(dev), attn_mask=mask.to(dev))  # (B, L, V)
        lp, hit = _gather(logits[torch.tensor(where_b), torch.tensor(where_t)], torch.tensor(targets, device=dev))
        lp, hit = lp.cpu().tolist(), hit.cpu().tolist()
        sums: dict[tuple[int, int], list] = {}
        for (b, j), v, h in zip(owner, lp, hit):
            acc = sums.setdefault((b, j), [0.0, True, 0])
            acc[0] += v
            acc[1] = acc[1] and h
            acc[2] += 1
        for (b, j), (v, h, n) in sums.items():
            result[(batch[b].request, j)] = Score(v, h, n)
    return [[result[(i, j)] for j in range(len(r.continuations))] for i, r in enumerate(requests)]


__all__ = ["Request", "Score", "make_request", "score_naive", "score_packed"]
