"""The prompt-training loop (CoOp's optimisation recipe: `schedule`, docs/recipes.md).

SGD on the prompt parameters only (float32 master weights); LR per epoch from `coop_lr` (or the objective's own
`schedule`); a fresh
random permutation of the training set each epoch with Dassl's drop-last rule; the model of the last
epoch is the result (no validation). Every random draw of an epoch is a function of the trainer's generator
at the epoch's start (the permutation, then one epoch seed from which each image's augmentation and each
batch's feature-bank draws are seeded by position), so a run resumed from a checkpoint at any step, with any
number of loader workers, continues exactly as an uninterrupted one (see `checkpoint`). Image features come from a source: `ExactFeatures` (fresh
augmentation every step, the paper's protocol; the image tower under inference mode) or `FeatureBank`
(K pre-encoded augmented views per image; an approximation recorded as a deviation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch

from ..backbones.backbone import Backbone
from ..data.transforms import load_image
from ..data.types import Datum
from ..errors import VlpromptError
from ..utils.faults import fault_point
from ..utils.hardware import loader_workers
from ..recipes.records import Deviation
from ..utils.progress import Progress, say
from ..methods.base import Objective
from .checkpoint import (OBJECTIVE_LAYOUT, Checkpointer, check_progress, global_random_state, objective_state,
                         restore_failed, set_global_random_state)
from .features import encode_items
from .schedule import Schedule, batches_per_epoch


@dataclass
class TrainSettings:
    """The optimisation recipe; its paper defaults live in `RunConfig` (see `from_config`)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: int
    warmup_lr: float
    seed: int
    num_workers: Optional[int] = None  # None: `utils.hardware.loader_workers` decides by device
    cache_images: int = 5000  # decode at most this many training images once and keep them in memory
    explicit_epochs: bool = False  # epochs set by the user, not by the recipe (a schedule counted in iterations
    # then trains that many epochs instead of its own length)

    @classmethod
    def from_config(cls, cfg, epochs: int) -> "TrainSettings":
        return cls(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                   weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                   seed=cfg.seed, num_workers=cfg.num_workers, explicit_epochs=cfg.epochs is not None)


class DecodedImages:
    """Keeps decoded full-resolution training images in memory: RandomResizedCrop needs the original."""

    def __init__(self, items: Sequence[Datum], limit: int, progress: bool):
        self.images = {}
        if len(items) <= limit:
            bar = Progress("decoding training images", len(items), enabled=progress)
            for item in items:
                if item.path not in self.images:
                    self.images[item.path] = load_image(item.path)
                bar.update()

    def __call__(self, path: str):
        image = self.images.get(path)
        return image if image is not None else load_image(path)


@dataclass
class TrainBatch:
    """One training step's input: raw (unnormalised) image features per view, float32, no graph."""

    views: dict[str, torch.Tensor]  # view name -> (B, d); CoOp has one view, "weak"
    labels: torch.Tensor  # (B,)
    index: torch.Tensor  # (B,) positions in the training list
    # Exact mode only (None in feature-bank mode): the normalised augmented images per view and the frozen
    # image encoder, so an objective can encode images it builds itself (e.g. pixel mixing).
    pixels: Optional[dict[str, torch.Tensor]] = None  # view name -> (B, 3, H, W)
    encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # images -> raw features, no graph


class ViewsDataset(torch.utils.data.Dataset):
    """Each item as one augmented image per view (each view drawn independently) plus label and index. An
    item is asked for as ``(index, seed)``: its augmentation draws come from ``seed`` alone, never from the
    global random state, so they do not depend on workers, on resuming, or on what the loss draws."""

    def __init__(self, items: Sequence[Datum], views: dict[str, Callable], loader: Callable):
        self.items, self.views, self.loader = list(items), views, loader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        image = self.loader(self.items[index].path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = tuple(tf(image) for tf in self.views.values())
        return views, self.items[index].label, index


def seeded_batches(batches: list[list[int]], seed: int) -> list[list[tuple[int, int]]]:
    """``(index, seed + position in the epoch)`` for every item of every batch."""
    out, pos = [], 0
    for batch in batches:
        out.append([(i, (seed + pos + t) % 2**63) for t, i in enumerate(batch)])
        pos += len(batch)
    return out


class TrainingSource(Protocol):
    """What a training objective may use of where its image features come from (and nothing else):

    - ``epoch(batches, seed, start=0)``: the `TrainBatch` of each list of training-set positions from
      batch ``start`` on, in order; every random draw is a function of ``seed`` and the batch's position;
    - ``stored_features(view)``: (features (N x K, d), labels (N x K,)) of every stored draw of a view, or
      None when the source stores none (exact mode augments afresh);
    - ``deviation``: how the source departs from the paper's protocol (a `recipes.Deviation`), or None.
    Pixels, where a method needs them, come with each batch (``TrainBatch.pixels``, exact mode only).
    """

    deviation: Optional[Deviation]

    def epoch(self, batches: list[list[int]], seed: int, start: int = 0) -> Iterator[TrainBatch]: ...

    def stored_features(self, view: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]: ...


class PixelSource:
    """For learners whose image features depend on their parameters (``Needs.cacheable_features=False``): every
    step augments afresh, exactly as `ExactFeatures`, and hands over the normalised images only; the frozen
    tower runs only when the objective asks for it (``TrainBatch.encode``, e.g. a frozen teacher)."""

    deviation = None

    def stored_features(self, view: str) -> None:
        return None

    def __init__(self, bb: Backbone, items: Sequence[Datum], views: dict[str, Callable], settings: TrainSettings,
                 progress: bool):
        self.bb, self.names, self.num_workers = bb, list(views), settings.num_workers
        self.dataset = ViewsDataset(items, views, DecodedImages(items, settings.cache_images, progress))

    def loader(self, batches: list[list[int]], seed: int, start: int = 0):
        """(images per view, labels, indices) of each batch from ``start`` on."""
        # The loader's own generator only seeds its workers; it keeps the loader off the global random state.
        # On a GPU, pinned batches copy to the device without blocking (`epoch`).
        dev = self.bb.device
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=seeded_batches(batches, seed)[start:],
                                           num_workers=loader_workers(self.num_workers, dev),
                                           pin_memory=dev.type == "cuda",
                                           generator=torch.Generator().manual_seed(seed))

    def epoch(self, batches: list[list[int]], seed: int, start: int = 0):
        dev = self.bb.device
        for images, y, idx in self.loader(batches, seed, start):
            pixels = {name: x.to(dev, non_blocking=True) for name, x in zip(self.names, images)}
            yield TrainBatch({}, y.to(dev, non_blocking=True), idx.to(dev, non_blocking=True), pixels, self.encode)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen raw features of ``images`` as a normal tensor (not an inference-mode one), no graph."""
        return self.bb.encode_images(images).clone()


class ExactFeatures(PixelSource):
    """Exact mode: every step augments afresh (images decoded once and kept in memory) and encodes its
    batch, all views in one frozen image-tower call."""

    def epoch(self, batches: list[list[int]], seed: int, start: int = 0):
        for images, y, idx in self.loader(batches, seed, start):
            # .clone() gives a normal tensor: inference-mode tensors cannot enter autograd.
            feats = self.bb.encode_images(torch.cat(images)).clone().chunk(len(images))
            dev = feats[0].device
            pixels = {name: x.to(dev, non_blocking=True) for name, x in zip(self.names, images)}
            yield TrainBatch(dict(zip(self.names, feats)), y.to(dev, non_blocking=True), idx.to(dev, non_blocking=True),
                             pixels, self.encode)


class FeatureBank:
    """Feature-bank mode (an approximation): ``views`` augmented draws of every training image are encoded
    once per distinct transform; each step picks stored draws instead of augmenting afresh. Views that
    share a transform (CPT's two strong views) get different stored draws of it."""

    def __init__(self, bb: Backbone, items: Sequence[Datum], views: dict[str, Callable], settings: TrainSettings,
                 progress: bool, bank_views: int):
        self.k = bank_views
        kinds: dict[int, Callable] = {}  # one bank per distinct transform object
        self.view_kind = {}
        for name, tf in views.items():
            kinds.setdefault(id(tf), tf)
            self.view_kind[name] = id(tf)
        for kind in kinds:
            shared = sum(1 for v in self.view_kind.values() if v == kind)
            if shared > bank_views:
                raise VlpromptError(f"bank_views={bank_views} is too few: {shared} views per step use the same "
                                    "transform and need different stored draws")
        self.deviation = Deviation("train_mode", "feature_bank", "exact", "paper",
                                   f"{bank_views} augmented views per training image and transform encoded once, "
                                   "drawn per step (the paper augments afresh every step)")
        images = DecodedImages(items, settings.cache_images, progress)
        bar = Progress("encoding the feature bank", bank_views * len(items) * len(kinds), enabled=progress)
        self.banks = {}
        for kind, tf in kinds.items():
            # .clone() gives normal tensors: inference-mode tensors cannot enter autograd.
            draws = [encode_items(bb, items, tf, 100, settings.num_workers, loader=images, bar=bar)[0].clone()
                     for _ in range(bank_views)]
            self.banks[kind] = torch.stack(draws, dim=1)  # (N, K, d)
        self.labels = torch.tensor([it.label for it in items], device=next(iter(self.banks.values())).device)

    @property
    def bank(self) -> torch.Tensor:
        """The bank of the first view's transform, (N, K, d)."""
        return self.banks[next(iter(self.view_kind.values()))]

    def stored_features(self, view: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored draw of ``view``'s transform, (N x K, d), image-major, with its labels."""
        bank = self.banks[self.view_kind[view]]
        return bank.reshape(-1, bank.shape[-1]), self.labels.repeat_interleave(bank.shape[1])

    def epoch(self, batches: list[list[int]], seed: int, start: int = 0):
        dev = self.labels.device
        for j in range(start, len(batches)):
            batch = batches[j]
            generator = torch.Generator().manual_seed((seed + j) % 2**63)
            idx = torch.tensor(batch, device=dev)
            # Per image, a random order of its stored draws; the views of one transform take them in turn.
            order = {kind: torch.rand(len(batch), self.k, generator=generator).argsort(dim=1).to(dev)
                     for kind in self.banks}
            used = dict.fromkeys(self.banks, 0)
            views = {}
            for name, kind in self.view_kind.items():
                views[name] = self.banks[kind][idx, order[kind][:, used[kind]]]
                used[kind] += 1
            yield TrainBatch(views, self.labels[idx], idx)


def epoch_batches(n_items: int, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> list[list[int]]:
    """A fresh permutation cut into batches with the drop-last rule (or keeping the last partial batch)."""
    perm = torch.randperm(n_items, generator=generator).tolist()
    n_batches = batches_per_epoch(n_items, batch_size) if drop_last else -(-n_items // batch_size)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def _epoch_plan(n_items: int, settings: TrainSettings, schedule: Schedule, epoch: int, gen: torch.Generator):
    """(batches, epoch seed) of ``epoch``, which starts at ``gen``'s current state: the whole permutation is
    drawn, then cut where the schedule's steps end."""
    batches = epoch_batches(n_items, settings.batch_size, gen, schedule.drop_last)
    return batches[:schedule.steps_in_epoch(epoch)], int(torch.randint(0, 2**62, (1,), generator=gen))


class LossObjective(Objective):
    """An objective that is its loss function alone (``loss_fn(learner, batch)``), every other step the default."""

    def __init__(self, loss_fn: Callable):
        super().__init__()
        self.loss = loss_fn


def train_prompt(learner: torch.nn.Module, objective: Objective | Callable, source, n_items: int,
                 settings: TrainSettings, progress: bool = True, checkpoint: Optional[Checkpointer] = None) -> dict:
    """Train ``learner`` in place on batches from ``source`` (`ExactFeatures` or `FeatureBank`).

    ``objective`` (a `methods.base.Objective`, or a bare ``loss(learner, batch) -> (loss, {term: value})``)
    builds the optimiser, gives each step's loss (a ``logits`` term (B, C) gives the training accuracy) and its
    gradients (``objective.backward``), and is told when an epoch (``on_epoch_end``, 0-based) and the training
    (``on_train_end``) end. How long it trains and the learning rate of every param group at every step are the
    objective's `Schedule` (``objective.schedule``: CoOp's per-epoch cosine by default). With
    ``checkpoint``, training resumes from its saved state when there is one and saves at the end of every
    epoch (and every ``checkpoint.every`` steps), the objective's ``state_dict()`` included. A non-finite loss
    stops training with one error line. Returns the per-epoch history: lr, mean of each logged term, training
    accuracy, seconds.
    """
    if not isinstance(objective, Objective):
        objective = LossObjective(objective)
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = objective.optimizer(params, settings)
    gen = torch.Generator().manual_seed(settings.seed)
    history = []
    schedule = objective.schedule(settings, n_items)
    per_epoch, n_steps = schedule.per_epoch, schedule.steps
    start_epoch, start_step, partial = 0, 0, None
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        check_progress(saved, checkpoint.path, schedule.epochs, per_epoch)
        try:  # a crafted or damaged state of the right types: one line, not a stack trace
            learner.load_state_dict(saved["learner"])
            opt.load_state_dict(saved["optimizer"])
            gen.set_state(saved["generator"])
            set_global_random_state(saved["random"])
            objective.load_state_dict(objective_state(saved))
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
            raise restore_failed(checkpoint.path, exc) from None
        history, partial = saved["history"], saved["partial"]
        start_epoch, start_step = saved["epoch"], saved["step_in_epoch"]
        say(f"resuming from {checkpoint.path}: epoch {start_epoch + 1}, step {start_step + 1} of {per_epoch}",
            progress)

    def save(epoch: int, step_in_epoch: int, epoch_state, part) -> None:
        checkpoint.save({"learner": learner.state_dict(), "optimizer": opt.state_dict(), "generator": epoch_state,
                         "epoch": epoch, "step_in_epoch": step_in_epoch, "history": history, "partial": part,
                         "random": global_random_state(), "objective": objective.state_dict(),
                         "objective_layout": OBJECTIVE_LAYOUT})

    bar = Progress("training", n_steps, enabled=progress, every_s=10.0)
    bar.done = start_epoch * per_epoch + start_step
    learner.train()
    t_start = time.perf_counter()
    for epoch in range(start_epoch, schedule.epochs):
        t0 = time.perf_counter()
        lr = epoch_lr = schedule.lr(epoch, 0)
        epoch_state = gen.get_state()
        batches, seed = _epoch_plan(n_items, settings, schedule, epoch, gen)
        first = start_step if epoch == start_epoch else 0
        part = partial if epoch == start_epoch and partial else {"sums": {}, "correct": 0, "seen": 0, "seconds": 0.0}
        sums, correct, seen = dict(part["sums"]), part["correct"], part["seen"]
        for step, batch in enumerate(source.epoch(batches, seed, first), start=first):
            y = batch.labels
            lr = schedule.lr(epoch, step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, terms = objective.loss(learner, batch)
            if not torch.isfinite(loss.detach()).all():
                raise VlpromptError(f"training stopped: the loss is {float(loss.detach())} at epoch {epoch + 1}, "
                                    f"step {step + 1} (lr {lr:g}, weight_decay {settings.weight_decay:g})")
            opt.zero_grad(set_to_none=True)
            objective.backward(params, loss, terms)
            opt.step()
            for k, v in terms.items():
                if k != "logits":
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * len(y)
            if "logits" in terms:
                correct += int((terms["logits"].argmax(-1) == y).sum())
            seen += len(y)
            bar.update(1, extra=f"epoch {epoch + 1}/{schedule.epochs} loss {float(loss.detach()):.4f}")
            done = epoch * per_epoch + step + 1
            if checkpoint is not None and checkpoint.every and done % checkpoint.every == 0 and step + 1 < len(batches):
                save(epoch, step + 1, epoch_state, {"sums": sums, "correct": correct, "seen": seen,
                                                    "seconds": part["seconds"] + time.perf_counter() - t0})
            fault_point("step")
        record = {"epoch": epoch + 1, "lr": epoch_lr, **{k: v / max(seen, 1) for k, v in sums.items()},
                  "train_accuracy": 100.0 * correct / max(seen, 1),
                  "seconds": part["seconds"] + time.perf_counter() - t0}
        history.append(record)
        objective.on_epoch_end(epoch, learner)  # before the save: what it changes belongs to this epoch
        if checkpoint is not None:
            save(epoch + 1, 0, gen.get_state(), None)
    # After the last checkpoint (which holds the learner before it: a resume calls it again), before the caller
    # saves the learner.
    objective.on_train_end(learner)
    learner.eval()
    say(f"training done in {time.perf_counter() - t_start:.1f}s", progress)
    return {"epochs": history, "steps": n_steps, "seconds": time.perf_counter() - t_start,
            "schedule": {"unit": schedule.unit, "epochs": schedule.epochs, "batches_per_epoch": per_epoch,
                         "drop_last": schedule.drop_last, "reference_steps": schedule.reference_steps}}
