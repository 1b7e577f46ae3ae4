"""The issue's reference point, rebuilt for same-run comparison: a GPT-2-style model and training
step as karpathy/nanoGPT builds them (written here from its description; none of its code).

Why it exists: this 2-core machine's speed drifts by 30 % and more between runs (a shared host), so
"≥ 2× nanoGPT" is only meaningful when both are timed in the same run. `train_throughput.py
--baseline` times this model beside lmforge's, on the same token batches and thread count.

What matches nanoGPT's `model.py` / `train.py` (shakespeare_char-style settings, dropout 0):
- learned position embedding added to the token embedding; pre-norm blocks with LayerNorm
  without bias; one fused c_attn Linear (d -> 3d) split into q, k, v; attention through
  `F.scaled_dot_product_attention(is_causal=True)`; output projection; MLP d -> 4d -> d with
  exact GELU; final LayerNorm; lm_head tied to the token embedding; no biases (bias=False);
- init normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer);
- AdamW with 2-D tensors decayed and the rest not, `fused` only on CUDA (so on the CPU the
  per-tensor loop PyTorch defaults to), betas (0.9, 0.99); bf16 via `torch.autocast`;
  `zero_grad(set_to_none=True)`; grad clip 1.0; loss = mean cross-entropy over the logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPTBaseline(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int, n_head: int, d_model: int, block_size: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.h = nn.ModuleList(_Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def baseline_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    on_cuda = params[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), **({"fused": True} if on_cuda else {}))


def baseline_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  dtype: str) -> float:
    """One nanoGPT-style optimizer step: per micro batch a forward under autocast and a backward of
    loss / n_micro, then clip, step, zero_grad(set_to_none=True)."""
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            _, loss = model(x, y)
        (loss / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
