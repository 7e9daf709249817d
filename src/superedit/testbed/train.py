"""Train a GPT-2-style model from scratch on CPU on a world's biographies."""

from __future__ import annotations

import math
import os
import random
import re
import time
from typing import Any

from superedit.testbed.sizes import Size
from superedit.testbed.world import World
from superedit.utils.logs import get_logger

log = get_logger(__name__)


def make_model(size: Size, tokenizer, n_positions: int = 256, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=size.n_embd,
                     n_layer=size.n_layer, n_head=size.n_head, n_inner=4 * size.n_embd,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


def _batches(world: World, tokenizer, rng: random.Random, batch_size: int, record_prob: float = 0.0,
             name_prob: float = 0.5, bottleneck: float = 0.0):
    """Padded batches of one pass of training documents: (ids, attention mask, labels).

    With ``bottleneck`` > 0, that share of documents gets a 4-D attention mask in which positions
    after a full-name mention cannot attend to the mention's non-final tokens: whatever later
    positions need about the subject must be read from its LAST token (the locate-then-edit
    premise), so the model composes the subject there."""
    import torch

    docs = world.training_documents(rng, record_prob=record_prob, name_prob=name_prob)
    eos = tokenizer.eos_token
    texts = [d + eos for d in docs]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=bool(bottleneck))  # BOS if the tokenizer adds one
    names = sorted({s.name for s in world.subjects}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(n) for n in names)) if bottleneck and names else None
    for i in range(0, len(texts), batch_size):
        idx = list(range(i, min(i + batch_size, len(texts))))
        chunk = [enc["input_ids"][j] for j in idx]
        w = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), w), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), w), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), w), dtype=torch.long)
        for k, c in enumerate(chunk):
            ids[k, :len(c)] = torch.tensor(c)
            labels[k, :len(c)] = torch.tensor(c)
            mask[k, :len(c)] = 1
        if pattern is not None:
            causal = torch.tril(torch.ones(w, w, dtype=torch.bool))
            full = causal[None, None].repeat(len(chunk), 1, 1, 1) & mask.bool()[:, None, None, :]
            for k, j in enumerate(idx):
                if rng.random() >= bottleneck:
                    continue
                offs = enc["offset_mapping"][j]
                for m in pattern.finditer(texts[j]):
                    toks = [t for t, (a, b) in enumerate(offs) if a < m.end() and b > m.start()]
                    if len(toks) >= 2:
                        full[k, 0, toks[-1] + 1:, toks[:-1]] = False
            yield ids, full, labels
        else:
            yield ids, mask, labels


def eval_recall(model, tokenizer, world: World, n: int = 300, seed: int = 0) -> dict[str, float]:
    from superedit.eval.scoring import fact_recall
    from superedit.models import ModelAdapter

    adapter = ModelAdapter(model, tokenizer)
    rng = random.Random(seed)
    out = {}
    for split in ("train", "heldout"):
        ps = world.prompts(split)
        if not ps:
            continue
        if len(ps) > n:
            ps = rng.sample(ps, n)
        hits = fact_recall(adapter, [p.prompt for p in ps], [p.target for p in ps])
        out[split] = sum(hits) / len(hits)
    return out


def train_model(world: World, tokenizer, size: Size, seed: int = 0, eval_every: int = 200,
                epochs: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Train ``size`` on ``world``; returns (model, figures)."""
    import torch

    from superedit.utils.progress import progress

    threads = int(os.environ.get("SUPEREDIT_TRAIN_THREADS", "1"))
    torch.set_num_threads(threads)  # 1 thread: far faster than 2 when the cores are shared
    torch.manual_seed(seed)
    epochs = epochs or size.epochs
    model = make_model(size, tokenizer, seed=seed)
    n_docs = len(world.training_documents(random.Random(0)))
    steps_per_epoch = math.ceil(n_docs / size.batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, min(200, total // 20))
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warm:
            return size.lr * (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        return size.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = random.Random(f"superedit-train:{seed}")
    model.train()
    t0 = time.time()
    step, rec, ema = 0, {}, None
    bar = progress(total=total, desc=f"train {size.name}")
    history = []
    for ep in range(epochs):
        for ids, mask, labels in _batches(world, tokenizer, rng, size.batch_size, size.record_prob, size.name_prob,
                                                 size.subject_bottleneck):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if step % eval_every == 0 or step == total:
                rec = eval_recall(model, tokenizer, world, n=200)
                history.append(dict(step=step, epoch=ep + 1, loss=round(ema, 4), **rec,
                                    seconds=round(time.time() - t0, 1)))
                log.debug("step %d %s", step, history[-1])
            bar.set_postfix(loss=f"{ema:.3f}", recall=f"{rec.get('train', 0):.2f}",
                            para=f"{rec.get('heldout', 0):.2f}")
            bar.update(1)
    bar.close()
    model.eval()
    final = eval_recall(model, tokenizer, world, n=10**9)
    figures = dict(epochs=epochs, steps=step, batch_size=size.batch_size, lr=size.lr,
                   final_loss=round(ema or 0.0, 4), recall=final.get("train"),
                   paraphrase_recall=final.get("heldout"), train_seconds=round(time.time() - t0, 1),
                   threads=threads, history=history, n_params=sum(p.numel() for p in model.parameters()))
    log.info("trained %s: recall %.3f paraphrase %.3f in %.0fs", size.name, figures["recall"] or 0,
             figures["paraphrase_recall"] or 0, figures["train_seconds"])
    return model, figures
