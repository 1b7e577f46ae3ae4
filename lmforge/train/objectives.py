"""Training objectives: what the loss of a batch is. Every objective runs in the one training
loop (train/loop.py `train_step`), so each inherits its promises: deterministic order, exact
resume, the guard, the store, the eval sidecar.

The interface (for a new objective, e.g. contrastive, classification, DPO):

    class MyObjective:
        name = "my_objective"                               # train.objective (config.OBJECTIVES too)
        @classmethod
        def from_config(cls, cfg: Config) -> MyObjective: ...  # its settings from the run's config
        def units(self, batch: Batch) -> int: ...           # what the loss averages over, before forward
        def loss(self, model, batch: Batch) -> LossOut: ...

- `batch` is a dict of tensors with a leading batch dimension, as a data source gives it
  (data/loader.py: `inputs`, `targets`, `loss_mask`, `documents` for token data; any keys for a
  `Records` source). The trainer splits a rank's batch into micro batches by slicing every tensor
  along dim 0, and moves them to the device; an objective only reads the keys it needs.
- `units(batch)` is the number of units the loss is averaged over (trained tokens, pairs,
  examples), known without a forward pass. The trainer sums it over all micro batches of the step
  and all ranks (one all-reduce) BEFORE any backward, and divides every micro batch's summed
  loss by that global count: a masked loss is weighted per unit exactly, and the gradient is the
  same on any number of processes and any micro batch size.
- `loss(model, batch)` runs the forward (under the trainer's autocast) and returns `LossOut`:
  `loss` the fp32 loss SUMMED over the batch's units, `count` those units (== units(batch)),
  `metrics` extra figures summed over units (the trainer logs each as its global mean per unit,
  e.g. DPO's reward accuracy). `averaged=True` says `loss` is already the mean over `count`; it is
  meant for objectives whose every micro batch has the same number of units (next-token without a
  mask), and keeps the trainer's arithmetic for them (mean per micro batch / number of micro
  batches) bit for bit what it was before objectives existed.
- Register it in REGISTRY below and its name in config.OBJECTIVES (config sits below train/ and
  validates names at load time; tests/test_objectives.py keeps the two equal). `make_objective`
  builds the run's objective from its config (an objective with settings or parts, as DPO's beta
  and reference, gets them there).

`validation_loss` is the objective's mean loss over batches of held-out data (the trainer's
`val_loss`): for next-token with a loss mask that is the loss on trained (completion) tokens only.
`validation` adds the mean of each of the objective's metrics (the trainer logs them as `val_<name>`).

DPO (Rafailov et al. 2023) trains on (chosen, rejected) completion pairs of one prompt
(data/loader.py `PreferencePairs`: `inputs`, `targets`, `loss_mask` of shape (B, 2, T)). Each
sequence's log-probability is the sum over its completion tokens (the loss mask); for the policy
(the model being trained) and for the reference (the weights it started from, without gradients,
under the same autocast dtype, so the two differ by training alone), the loss of a pair is

    -log sigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))

and its units are pairs. The metrics (mean per pair in metrics.jsonl and the store):
`chosen_reward` and `rejected_reward` (beta * (policy - ref) of each completion: DPO's implicit
rewards), `reward_margin` (their difference) and `reward_accuracy` (the fraction of pairs whose
chosen reward is strictly above the rejected one: 0 at step 0, where policy == reference).

The reference is a strategy (`Reference`): given the policy, a context in which a module computes
the reference's log-probabilities. `FrozenCopy` holds a frozen copy of the starting weights (full
fine-tuning: one more copy of the weights in memory, no gradients, no optimizer state); with LoRA
adapters the reference is the policy itself with its adapters switched off (no second copy). The
trainer builds it (train/loop.py), and records where its weights came from so a resume re-derives
it (train/init_from.py `load_reference`).


Contrastive (embeddings; docs/embeddings.md): a batch of pairs (data/pairs.py) is embedded with the
pooling of the run's `embed:` section (`understand/embed.pool`, the function inference uses, so
training and `lmforge embed` cannot drift apart), and each query is scored against every positive
(and hard negative) of its micro batch: InfoNCE / multiple-negatives ranking loss, cross-entropy
over cosine similarities / temperature with the query's own positive as the target. The in-batch
negatives are those of the micro batch, so `train.micro_batch` decides how many negatives a query
sees (micro_batch - 1 positives of others, plus micro_batch hard negatives when the data has them);
a global batch of several micro batches (and ranks) averages their losses per pair. The micro
batches of a global batch are the same on any world size, so deterministic_reduce stays
bit-identical to one process. Units are pairs; `in_batch_accuracy` is the share of queries whose
own positive scores highest. Pairs that carry groups (data/pairs.py: SetFit-style pairs built from
labels, a text's groups its labels) never use a text that shares a group with the query as its
negative: such a column (the query's own positive aside) is masked out of the softmax, so texts of
one label are not pushed apart (multi-label: texts sharing any label). A positive's groups are the
pair's `group` unless it has its own (`positive_group`); a hard negative is masked only by its
`negative_group` (without one it is the pair's negative, of none of the query's groups).

Classification (`lmforge classify train --method finetune`, docs/classify.md): a batch of labelled
texts (data/pairs.py `ExampleRecords`) is embedded exactly as the Embedder does it (the run's
`embed:` pooling, then its normalisation: `understand/embed.finish`), and the model's own
classification head (`model.score`, model.num_labels; started from a linear probe, see
train/init_from.py `init_score`) turns each vector into logits; the loss is cross-entropy
(single-label) or binary cross-entropy summed over labels (multi-label). Units are examples;
`accuracy` is the share classified right (multi-label: every label right at 0.5). Head and body
train together (LP-FT's order: linear probe, then fine-tune everything), and both are saved in the
model's weights, so a classifier serves exactly what the loss trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.loader import IGNORE, Batch, scored_targets
from ..errors import ConfigError
from ..model import autocast, document_attention
from ..understand.embed import Pooling, padding_masks, pool


@dataclass
class LossOut:
    loss: torch.Tensor  # () fp32: summed over the batch's units (their mean when `averaged`)
    count: int  # units the loss is over: trained tokens, pairs, examples
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # () each, summed over units
    averaged: bool = False  # `loss` is the mean over `count` (see the module docstring)


class Objective(Protocol):
    name: str

    def units(self, batch: Batch) -> int:
        """The units `loss` of this batch is over, without running the model."""
        ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        """The batch's loss, summed over its units (module docstring)."""
        ...


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The attention keywords of a batch: with `documents` (packed rows), positions restarting per
    document and a block-diagonal causal mask (model.document_attention); else none."""
    if "documents" not in batch:
        return {}
    positions, attn_mask = document_attention(batch["documents"])
    return {"positions": positions, "attn_mask": attn_mask}


class NextToken:
    """Next-token cross-entropy (pretraining, continued pretraining, SFT).

    With a `loss_mask` (SFT data) the loss is summed over the trained targets only and its units
    are those targets; without one it is the model's own mean over every target (`averaged`), the
    pretraining arithmetic unchanged. `documents` (packed rows) switch on document masking."""

    name = "next_token"

    @classmethod
    def from_config(cls, cfg: Config) -> NextToken:
        return cls()

    def units(self, batch: Batch) -> int:
        if "loss_mask" in batch:
            return int(batch["loss_mask"].sum())
        return int((batch["targets"] != IGNORE).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        x = batch["inputs"]  # (B, T)
        if "loss_mask" not in batch:
            _, mean = model(x, batch["targets"], **model_inputs(batch))
            return LossOut(mean, int((batch["targets"] != IGNORE).sum()), averaged=True)
        logits = model(x, **model_inputs(batch))  # (B, T, V)
        y = scored_targets(batch)
        total = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        return LossOut(total, int(batch["loss_mask"].sum()))


# The DPO reference: given the policy being trained, a context in which a module computes the
# reference's log-probabilities (module docstring).
Reference = Callable[[torch.nn.Module], AbstractContextManager[torch.nn.Module]]


class FrozenCopy:
    """The reference as a frozen copy of the starting weights (eval mode, no gradients)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module.eval().requires_grad_(False)

    def __call__(self, policy: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]:
        return nullcontext(self.module)


class AdaptersOff:
    """The reference as the policy itself with its LoRA adapters off (lora.adapters_disabled): with
    LoRA the frozen base is the starting model, so no second copy of the weights is needed."""

    @contextmanager
    def __call__(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        from ..lora import adapters_disabled

        with adapters_disabled(policy):
            yield policy


def sequence_logps(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) fp32: the log-probability of each row's scored targets (those not IGNORE), summed.
    inputs, targets: (N, T); right padding never changes a real position (causal attention)."""
    logits = model(inputs)  # (N, T, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(targets.shape).sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> LossOut:
    """DPO's loss and metrics from sequence log-probabilities, both (B, 2): [:, 0] chosen,
    [:, 1] rejected; the loss summed over the B pairs (module docstring)."""
    rewards = beta * (policy - reference.detach())  # (B, 2): the implicit rewards
    margin = rewards[:, 0] - rewards[:, 1]  # (B,)
    loss = -F.logsigmoid(margin).sum()
    with torch.no_grad():
        metrics = {"reward_accuracy": (margin > 0).float().sum(), "reward_margin": margin.sum(),
                   "chosen_reward": rewards[:, 0].sum(), "rejected_reward": rewards[:, 1].sum()}
    return LossOut(loss, int(policy.shape[0]), metrics)


class DPO:
    """Direct preference optimisation against a reference (module docstring). Units: pairs."""

    name = "dpo"

    def __init__(self, beta: float, reference: Reference) -> None:
        self.beta, self.reference = beta, reference

    def units(self, batch: Batch) -> int:
        return int(batch["inputs"].shape[0])

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        n, _, t = batch["inputs"].shape  # (B, 2, T)
        x, y = batch["inputs"].reshape(2 * n, t), scored_targets(batch).reshape(2 * n, t)  # rows: chosen, rejected, ...
        policy = sequence_logps(model, x, y).view(n, 2)
        with torch.no_grad(), self.reference(model) as ref:  # under the caller's autocast: the policy's dtype
            reference = sequence_logps(ref, x, y).view(n, 2)
        return dpo_loss(policy, reference, self.beta)


def pooled(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, W) right-padded ids, (B,) lengths -> (B, C) fp32 pooled vectors (not normalised), as the Embedder pools them."""
    T = int(lengths.max())
    mask, attn = padding_masks(lengths, T, pooling.bidirectional)
    hidden = model(ids[:, :T], attn_mask=attn, hidden=True, lengths=lengths)  # (B, T, C); through a DDP wrapper's forward
    return pool(hidden, mask, pooling.method)


def _groups(g: torch.Tensor) -> torch.Tensor:
    return g.view(g.shape[0], -1)  # (B,) one group per pair, or (B, K) padded with -1 (data/pairs.py)


def shares_a_group(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, K) and (B, K') groups padded with -1 -> (B, B) bool: row i's texts share a group with column j's."""
    a, b = _groups(rows)[:, None, :, None], _groups(cols)[None, :, None, :]  # (B, 1, K, 1), (1, B, 1, K')
    return ((a == b) & (a >= 0)).any(dim=(2, 3))


def group_mask(batch: Batch) -> torch.Tensor:
    """(B, B) or (B, 2B) bool: the columns of `Contrastive.scores` that share a group with the row's query,
    its own positive aside. Positives carry `positive_group` or else the pair's `group`; a negative without
    `negative_group` has no known group and is never masked."""
    q = batch["group"]
    same = shares_a_group(q, batch.get("positive_group", q)) & ~torch.eye(q.shape[0], dtype=torch.bool, device=q.device)
    if "negative" not in batch:
        return same
    neg = shares_a_group(q, batch["negative_group"]) if "negative_group" in batch else torch.zeros_like(same)
    return torch.cat([same, neg], dim=1)


class Contrastive:
    """In-batch negatives InfoNCE over (query, positive[, negative]) batches (module docstring)."""

    name = "contrastive"

    def __init__(self, temperature: float = 0.05, pooling: Pooling | None = None) -> None:
        self.temperature = temperature
        self.pooling = pooling or Pooling()

    @classmethod
    def from_config(cls, cfg: Config) -> Contrastive:
        return cls(cfg.train.contrastive_temperature, Pooling.from_config(cfg.embed))

    def units(self, batch: Batch) -> int:
        return int(batch["query"].shape[0])

    def embed(self, model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, W) right-padded ids, (B,) lengths -> (B, C) unit vectors, as the Embedder pools them."""
        return F.normalize(pooled(model, ids, lengths, self.pooling), dim=-1)  # (B, C) fp32

    def scores(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, B) or (B, 2B) fp32 logits: query i against every positive (then every negative) / temperature."""
        q = self.embed(model, batch["query"], batch["query_lengths"])
        docs = [self.embed(model, batch[part], batch[f"{part}_lengths"]) for part in ("positive", "negative") if part in batch]
        logits = q @ torch.cat(docs).T / self.temperature
        if "group" in batch:  # a text sharing a group with the query is no negative of it (module docstring)
            logits = logits.masked_fill(group_mask(batch), float("-inf"))
        return logits

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        logits = self.scores(model, batch)
        target = torch.arange(logits.shape[0], device=logits.device)  # query i's positive is column i
        total = F.cross_entropy(logits, target, reduction="sum")
        hits = (logits.argmax(dim=1) == target).sum().float()
        return LossOut(total, logits.shape[0], {"in_batch_accuracy": hits.detach()})


class Classification:
    """Cross-entropy of the model's classification head on the pooled embedding (module docstring). Units: examples."""

    name = "classification"

    def __init__(self, pooling: Pooling | None = None) -> None:
        self.pooling = pooling or Pooling()

    @classmethod
    def from_config(cls, cfg: Config) -> Classification:
        return cls(Pooling.from_config(cfg.embed))

    def units(self, batch: Batch) -> int:
        return int(batch["text"].shape[0])

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, L) fp32: the head on the batch's embeddings, as understand/classify.py scores them."""
        from ..understand.embed import finish

        x = finish(pooled(model, batch["text"], batch["text_lengths"], self.pooling), self.pooling)  # (B, C)
        score = getattr(model, "module", model).score  # through a DDP wrapper: its module's head
        return F.linear(x, score.weight.float(), score.bias.float())

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        logits, y = self.logits(model, batch), batch["label"]
        if y.ndim == 2:  # multi-label: (B, L) 0/1
            total = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum")
            hits = ((logits > 0) == (y > 0.5)).all(dim=1).sum().float()
        else:
            total = F.cross_entropy(logits, y, reduction="sum")
            hits = (logits.argmax(dim=1) == y).sum().float()
        return LossOut(total, logits.shape[0], {"accuracy": hits.detach()})


REGISTRY: dict[str, type] = {NextToken.name: NextToken, DPO.name: DPO, Contrastive.name: Contrastive,
                             Classification.name: Classification}


def make_objective(cfg: Config, *, reference: Reference | None = None) -> Objective:
    """The run's objective: `train.objective` set up from the run's config (train.dpo_beta,
    train.contrastive_temperature, the embed: pooling) and the parts the trainer gives it (DPO's
    reference). Config validation names the nearest objective for a typo."""
    name = cfg.train.objective
    if name not in REGISTRY:
        raise ConfigError(f"train.objective: unknown objective {name!r} (valid: {', '.join(REGISTRY)})")
    if name == DPO.name:
        if reference is None:
            raise ValueError("the dpo objective needs a reference (train/loop.py builds it)")
        return DPO(cfg.train.dpo_beta, reference)
    return REGISTRY[name].from_config(cfg)


@torch.no_grad()
def validation(model: torch.nn.Module, objective: Objective, batches: Iterable[Batch], *, dtype: str = "fp32") -> dict[str, float]:
    """The objective's mean loss per unit over `batches` (`loss`; NaN when they hold no unit) and
    the mean per unit of each of its metrics (DPO: held-out reward accuracy and margins)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    metrics: dict[str, float] = {}
    dev = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(dev) for k, v in batch.items()}
            with autocast(dtype, dev.type):
                out = objective.loss(model, batch)
            total += float(out.loss) * (out.count if out.averaged else 1)
            count += out.count
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
    finally:
        model.train(was_training)
    return {"loss": total / count if count else math.nan} | {k: v / count for k, v in metrics.items() if count}


def validation_loss(model: torch.nn.Module, objective: Objective, batches: Iterable[Batch], *, dtype: str = "fp32") -> float:
    """The objective's mean loss per unit over `batches` (NaN when they hold no unit)."""
    return validation(model, objective, batches, dtype=dtype)["loss"]


__all__ = ["LossOut", "Objective", "NextToken", "DPO", "Contrastive", "Classification", "pooled", "FrozenCopy", "AdaptersOff", "Reference", "REGISTRY", "make_objective",
           "validation", "validation_loss", "model_inputs", "sequence_logps", "dpo_loss"]
