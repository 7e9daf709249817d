"""FT-L: fine-tune the MLP down-projection of chosen layers on the new targets (ROME's baseline).

Minimises the target NLL given each filled prompt with Adam; after each step every weight change is
clipped to ``[-norm_constraint, +norm_constraint]`` (the L∞ constraint). Returns a dense increment
(StepResult, no state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...models import ModelAdapter, encode_prompt_target
from ..delta import LayerDelta, WeightDelta
from ..hparams import FTHParams
from .protocol import StepResult


def ft_delta(adapter: ModelAdapter, requests: list, hparams: FTHParams, stats=None, state=None) -> StepResult:
    layers = sorted(hparams.layers)
    for l in layers:
        adapter.check_layer(l)
    params = {l: adapter.down_weight_param(l) for l in layers}
    originals = {l: p.detach().clone() for l, p in params.items()}
    history = []
    try:
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(list(params.values()), lr=hparams.lr, weight_decay=hparams.weight_decay)
        prompts = [r.filled_prompt() for r in requests]
        targets = [r.target_new for r in requests]
        for step in range(hparams.num_steps):
            total = 0.0
            for s in range(0, len(prompts), hparams.batch_size):
                b = encode_prompt_target(adapter.tokenizer, prompts[s:s + hparams.batch_size],
                                         targets[s:s + hparams.batch_size], device=adapter.device)
                mask, labels = b.loss_mask()
                opt.zero_grad()
                logits = adapter.model(**b.model_inputs()).logits
                logp = F.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                loss = (-(logp * mask).sum(1) / mask.sum(1)).mean()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b.prompt_lengths)
                if hparams.norm_constraint > 0:
                    with torch.no_grad():
                        for l, p in params.items():
                            p.copy_(originals[l] + (p - originals[l]).clamp(-hparams.norm_constraint, hparams.norm_constraint))
            history.append(total / len(prompts))
            if history[-1] < hparams.early_stop_nll:
                break
        deltas = {}
        with torch.no_grad():
            for l, p in params.items():
                d = (p.detach() - originals[l]).to(torch.float64)
                deltas[l] = LayerDelta(dense_=(d.T if adapter.spec.down_orientation == "in_out" else d).to(adapter.layer_dtype(l)))
    finally:
        with torch.no_grad():
            for l, p in params.items():
                p.copy_(originals[l])
                p.requires_grad_(False)
    return StepResult(WeightDelta(deltas, "ft", {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                                 "loss_history": history}))
