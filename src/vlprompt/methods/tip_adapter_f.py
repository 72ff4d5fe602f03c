"""Tip-Adapter-F (gaopengcuhk/Tip-Adapter): Tip-Adapter whose cache keys are fine-tuned.

The keys (initialised as in Tip-Adapter) are the only parameters; values, text features, alpha and beta
stay fixed during training at their initial values (init_alpha, init_beta), and the keys are not
re-normalised. AdamW (lr 0.001, eps 1e-4), cosine schedule over all iterations stepped every iteration, no
warm-up, batch 256, cross-entropy on Tip's logits, 20 epochs (EuroSAT 100). Then alpha and beta are searched
on the validation split as in Tip-Adapter (the same rule, option ``search_rule``). Deviations (recorded in each
run): the result is the last epoch (Tip-F keeps the epoch that scores best on the TEST set, and reports the
larger of two test accuracies); the training views are drawn from the cache's augmented passes (Tip-F augments
afresh every iteration); the search uses CoOp's few-shot val subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import VlpromptError
from ..recipes.records import Deviation
from .base import option, parse_options
from .tip_adapter import TipAdapter, TipAdapterMethod, TipAdapterOptions, augmented_passes, search_on_val

DEFAULT_EPOCHS = {"eurosat": 100}  # Tip's configs: 20 elsewhere


@dataclass
class TipAdapterFOptions(TipAdapterOptions):
    train_epochs: Optional[int] = option(None, "default: Tip's (20; EuroSAT 100)")
    lr: float = option(0.001, "AdamW learning rate (Tip: 0.001)")
    train_batch_size: int = option(256, "(Tip: 256)")

    def __post_init__(self):
        super().__post_init__()
        if self.train_epochs is not None and self.train_epochs < 1:
            raise VlpromptError(f"option train_epochs: must be >= 1, got {self.train_epochs}")
        if not self.lr > 0 or self.train_batch_size < 1:
            raise VlpromptError("options lr > 0 and train_batch_size >= 1 are required")


def train_keys(learner: TipAdapter, views: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
               epochs: int, lr: float, batch_size: int, seed: int) -> list[dict]:
    """Fine-tune ``learner.keys`` on ``views`` (N, K, d) raw features; each epoch draws one stored view per
    image, shuffled, in batches (the last partial batch kept, as Tip's loader does)."""
    keys = torch.nn.Parameter(learner.keys.clone())
    opt = torch.optim.AdamW([keys], lr=lr, eps=1e-4)
    n = views.shape[0]
    iters = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * iters)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        pick = torch.randint(views.shape[1], (n,), generator=gen)
        order = torch.randperm(n, generator=gen)
        total = correct = 0.0
        for i in range(iters):
            idx = order[i * batch_size:(i + 1) * batch_size]
            f = views[idx, pick[idx]]
            logits = learner.logits_with(f, keys, alpha, beta)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += float((logits.argmax(-1) == labels[idx]).sum())
        history.append({"epoch": epoch + 1, "loss": total / n, "train_accuracy": 100.0 * correct / n})
    learner.keys = keys.detach().clone()
    return history


class TipAdapterFMethod(TipAdapterMethod):
    name = "tip_adapter_f"
    Options = TipAdapterFOptions

    def fit(self, learner: TipAdapter, bb, ds, cfg, store) -> dict:
        options = parse_options(self.name, self.Options, cfg.method_options)
        s_beta, s_alpha, init_alpha, init_beta = options.resolved(ds.name)
        views = augmented_passes(bb, ds.train, options.augment_passes, cfg)  # (N, K, d)
        labels = torch.tensor([d.label for d in ds.train], device=bb.device)
        learner.set_cache(views.mean(dim=1), labels)
        epochs = options.train_epochs or DEFAULT_EPOCHS.get(ds.name, 20)
        history = train_keys(learner, F.normalize(views, dim=-1), labels, init_alpha, init_beta, epochs, options.lr,
                             options.train_batch_size, cfg.seed)
        learner.alpha, learner.beta = init_alpha, init_beta
        selected, search, deviations = search_on_val(learner, bb, ds, cfg, store, options, s_beta, s_alpha,
                                                     init_alpha, init_beta, self.name)
        deviations += [Deviation(f"{self.name}.selection", "the last epoch's keys", "the epoch best on the TEST set",
                                 "official code"),
                       Deviation(f"{self.name}.train_views", f"drawn from the cache's {options.augment_passes} "
                                 "augmented passes", "fresh augmentation every iteration", "official code")]
        return {"selected": selected, "search": search, "epochs": history, "deviations": deviations,
                "options": {"search_scale": [s_beta, s_alpha], "init_alpha": init_alpha, "init_beta": init_beta,
                            "augment_passes": options.augment_passes, "search_rule": options.search_rule,
                            "train_epochs": epochs, "lr": options.lr, "train_batch_size": options.train_batch_size}}
