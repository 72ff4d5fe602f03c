"""What a method is: how it builds its learner, which image views a training step needs, and its loss.

A method is one module in this package plus one entry in ``METHODS``. Its tunable settings are a typed
dataclass (``Options``) filled from ``RunConfig.method_options`` (``--option KEY=VALUE`` on the command
line, ``method_options:`` in YAML) and validated in its ``__post_init__``. What a learner is built from, its
`MethodConfig` (options, prompt layout, template, dataset name), is also what its artefact records
(`methods.loading`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, get_type_hints

import torch

from ..backbones.backbone import Backbone
from ..data.transforms import train_transform
from ..errors import VlpromptError


class Objective:
    """What one training run optimises. The default is CoOp's: one view with CoOp's training transform
    (Dassl's) and cross-entropy. Subclasses override ``view_transforms`` and ``loss``, and where a method
    needs it, the rest of its lifecycle, which `engine.trainer.train_prompt` runs in this order::

        prepare (run.py) -> optimizer, schedule -> [load_state_dict, when resuming]
        -> per step: loss, backward, (optimiser step) -> per epoch: on_epoch_end, (checkpoint: state_dict)
        -> on_train_end -> (run.py saves the learner)
    """

    def __init__(self, options=None):
        self.options = options

    def view_transforms(self, bb: Backbone) -> dict[str, Callable]:
        """View name -> transform; views that share a transform object share a feature bank."""
        return {"weak": train_transform(**bb.preprocess.train_args())}

    def prepare(self, bb: Backbone, items: Sequence, source) -> None:
        """Once per run, before training: precompute what the loss needs from the frozen training
        features; ``source`` is a `engine.trainer.TrainingSource`, of which only its documented protocol
        may be used. Default: nothing."""

    def loss(self, learner: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
        """(scalar loss, logged terms) for a `TrainBatch`; a ``logits`` term gives the training accuracy."""
        raise NotImplementedError

    def optimizer(self, params: list[torch.nn.Parameter], settings) -> torch.optim.Optimizer:
        """The optimiser of ``params`` (the learner's trainable parameters) under ``settings``
        (`engine.trainer.TrainSettings`). Default: CoOp's SGD. The trainer sets ``lr`` of every param group at
        every step from `schedule`, so an override must put every parameter in a group whose ``lr`` may be set
        so (a group that needs another rate is not supported)."""
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, dampening=0, nesterov=False)

    def schedule(self, settings, n_items: int):
        """How long the run trains and its learning rate at every step (`engine.schedule.Schedule`) for
        ``n_items`` training images under ``settings``. Default: CoOp's, ``settings.epochs`` whole epochs with
        Dassl's drop-last rule and the per-epoch cosine after warm-up (`engine.schedule.coop_lr`)."""
        from ..engine.schedule import EpochCosine  # lazily: the engine imports the methods

        return EpochCosine(n_items, settings)

    def backward(self, params: list[torch.nn.Parameter], loss: torch.Tensor, terms: dict) -> None:
        """Set the gradients of ``params`` (all None on entry) from one step's ``loss`` and logged ``terms``.
        Default: ``loss.backward()``; ProGrad projects one gradient against another."""
        loss.backward()

    def on_epoch_end(self, epoch: int, learner: torch.nn.Module) -> None:
        """After the optimiser step of epoch ``epoch``'s last batch (0-based: the first epoch is 0), before
        that epoch's checkpoint is written, so what it changes is saved with the epoch. Called once per
        epoch: not again for epochs a resumed run had finished. Default: nothing."""

    def on_train_end(self, learner: torch.nn.Module) -> None:
        """Once, after the last epoch (also when a resumed run found every epoch done) and before the learner
        is returned and saved: e.g. to replace the prompts by an average (PromptSRC's GPA). The checkpoint
        holds the learner before this call, so it runs again on a resume. Default: nothing."""

    def state_dict(self) -> dict:
        """What a checkpoint saves of this objective, besides the learner and the optimiser: a tree of dicts,
        lists, tuples, numbers, strings and tensors (stored exactly, any dtype). Default: the states of the
        objective's own torch / NumPy generators (attributes), under ``"generators"``; an objective with
        more state extends it: ``{**super().state_dict(), "mine": ...}``."""
        from ..engine.checkpoint import generators_state  # lazily: the engine imports the methods

        return {"generators": generators_state(self)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (when a run resumes, before its first step). Tensors come back
        on the CPU: move them where they are used."""
        from ..engine.checkpoint import set_generators_state

        set_generators_state(self, state["generators"])

    @property
    def deviations(self) -> list:
        """How this objective departs from (or reconstructs) the paper, for metrics.json: `recipes.Deviation`
        records (plain words are accepted and recorded under the method's name)."""
        return []

    def options_dict(self) -> dict:
        return dataclasses.asdict(self.options) if self.options is not None else {}


def option(default, help: str, official=None):
    """One method setting: its default and the help text `vlprompt methods` prints (declared once).
    ``official``: the value that follows the official code where the default does not (choosing it is no
    deviation from the method's recipe)."""
    return dataclasses.field(default=default, metadata={"help": help, "official": official})


@dataclass(frozen=True)
class Needs:
    """What a method declares about itself; the engine, the studies and `vlprompt methods` read this."""

    trains: bool = True  # False: a baseline with nothing to learn (zero-shot CLIP)
    fitted: bool = False  # learned by the method's own fit() (a closed form or a search), not by SGD epochs
    pixels: bool = False  # its loss needs the augmented images themselves, not only their features
    cacheable_features: bool = True  # its image features may be cached or drawn from a feature bank
    classifier: str = "text prompts"  # "text prompts" (classes are text) | "head" (a layer over image features)
    transfers: bool = True  # can be rebuilt for other class names (new classes, other datasets)

    def describe(self) -> str:
        learns = "fitted" if self.fitted else "trains" if self.trains else "no training"
        return (f"{learns}; classifier: {self.classifier}; "
                f"{'transfers to new class names' if self.transfers else 'tied to its classes'}"
                f"{'; needs pixels' if self.pixels else ''}"
                f"{'' if self.cacheable_features else '; image features not cacheable'}")


@dataclass(frozen=True)
class PromptLayout:
    """The CoOp prompt layout (context vectors, class-token position) of the methods whose classes are text
    prompts."""

    n_ctx: int = 16
    ctx_init: Optional[str] = None
    csc: bool = False
    class_token_position: str = "end"
    ctx_init_rule: str = "words"

    def kwargs(self) -> dict:
        """The layout as keyword arguments of the CoOp-family learners."""
        return dataclasses.asdict(self)


@dataclass
class MethodConfig:
    """Everything a method's learner and objective are built from, resolved once per run by `method_config`:
    a method is built from ``(backbone, classnames, MethodConfig)`` and reads nothing else of the run."""

    method: str
    options: Any  # the method's own Options instance (None when it has none)
    layout: PromptLayout
    template: str  # the hand-crafted template in use: the dataset's, or the run's override
    dataset: str  # the name of the dataset the classes come from (per-dataset recipes, templates)
    # Training only (never in an artefact): a loaded learner gets these defaults.
    batch_size: int = 1
    seed: int = 1
    train_mode: str = "exact"
    n_train: int = 0  # training images (a contrastive loss needs two per batch)
    shots: int = 0  # images per class asked for (-1: all; 0: unknown): a length counted per shot (CLIP-LoRA)

    def artifact(self) -> dict:
        """What a saved learner records of its configuration (`prompts.artifact`): everything it is built from,
        nothing of how it was trained."""
        return {"options": dataclasses.asdict(self.options) if self.options is not None else None,
                "layout": dataclasses.asdict(self.layout), "template": self.template, "dataset": self.dataset}

    @classmethod
    def from_artifact(cls, method, saved) -> "MethodConfig":
        """The inverse of `artifact` for ``method`` (a registered method), every value checked: one error line
        names the first bad one."""
        if not isinstance(saved, dict):
            raise VlpromptError("field 'config' must be an object")
        unknown = sorted(set(saved) - set(ARTIFACT_KEYS))
        if unknown:
            raise VlpromptError(f"field 'config' has unknown key {unknown[0]!r} (known: {', '.join(ARTIFACT_KEYS)})")
        options = parse_options(method.name, method.Options, _mapping(saved.get("options"), "config.options"))
        layout = _mapping(saved.get("layout"), "config.layout")
        hints = get_type_hints(PromptLayout)
        for key, value in layout.items():
            if key not in hints:
                raise VlpromptError(f"field 'config.layout' has unknown key {key!r}")
            if not _is(value, hints[key]):
                raise VlpromptError(f"field 'config.layout.{key}' has a value of the wrong type ({str(value)[:40]!r})")
        for key in ("template", "dataset"):
            if not isinstance(saved.get(key, ""), str):
                raise VlpromptError(f"field 'config.{key}' must be a string")
        return cls(method.name, options, PromptLayout(**layout), saved.get("template") or "a photo of a {}.",
                   saved.get("dataset", ""))


ARTIFACT_KEYS = ("options", "layout", "template", "dataset")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise VlpromptError(f"field '{where}' must be an object")
    return value


def _is(value, hint) -> bool:
    """Whether a JSON value has the type ``hint`` (int, str, bool or Optional of one): a bool is no int."""
    allowed = getattr(hint, "__args__", None) or (hint,)
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, tuple(a for a in allowed if a is not bool))


def method_config(method, cfg, dataset=None) -> "MethodConfig":
    """The `MethodConfig` of ``method`` for a run (``cfg``, a RunConfig) on ``dataset`` (DatasetSplits); a bad
    option is one error line here, before anything is built."""
    options = parse_options(method.name, method.Options, cfg.method_options)
    layout = PromptLayout(cfg.n_ctx, cfg.ctx_init, cfg.csc, cfg.class_token_position, cfg.ctx_init_rule)
    template = cfg.template or (dataset.template if dataset is not None else "a photo of a {}.")
    return MethodConfig(method.name, options, layout, template, dataset.name if dataset is not None else "",
                        cfg.batch_size, cfg.seed, cfg.train_mode, len(dataset.train) if dataset is not None else 0,
                        cfg.shots)


class MethodBase:
    """What every registered method shares: its declared `Needs`, read through ``trains``; `create`, the
    learner that records what it was built from; `load`, a saved one."""

    name: str
    needs: Needs = Needs()
    Options: Optional[type] = None
    # With needs.transfers False: what the learner is, in words, when other class names are refused.
    tied_to_classes: str = "its learner is one"

    @property
    def trains(self) -> bool:
        return self.needs.trains

    def create(self, backbone: Backbone, classnames: Sequence[str], config: MethodConfig) -> torch.nn.Module:
        """`build`, and the learner records its method and configuration: that is what it saves."""
        learner = self.build(backbone, classnames, config)
        learner.method = self.name
        learner.method_config = config
        return learner

    def load(self, path, backbone: Backbone, classnames: Optional[Sequence[str]] = None, dataset=None,
             template: Optional[str] = None) -> torch.nn.Module:
        """A saved learner (`vlprompt.load_prompt`: rebuilt by the method it was saved by)."""
        from .loading import load_prompt  # lazily: the loader reads the registry

        if not self.trains:
            raise VlpromptError(f"method {self.name} has no saved prompt to load")
        return load_prompt(path, backbone, classnames, dataset=dataset, template=template)


class Method(Protocol):
    name: str
    needs: Needs
    trains: bool  # needs.trains
    Options: Optional[type]  # dataclass of the method's settings, or None

    def build(self, backbone: Backbone, classnames: Sequence[str], config: MethodConfig) -> torch.nn.Module:
        """The learner for ``classnames`` (built from ``config`` alone: a saved learner is rebuilt so)."""

    def create(self, backbone: Backbone, classnames: Sequence[str], config: MethodConfig) -> torch.nn.Module:
        """`build`, recording the method and ``config`` on the learner (`MethodBase.create`)."""

    def objective(self, learner: torch.nn.Module, config: MethodConfig) -> Objective:
        """The training objective of a run (only for methods trained by SGD epochs)."""

    def load(self, path: str, backbone: Backbone, classnames: Sequence[str], dataset=None,
             template: Optional[str] = None) -> torch.nn.Module:
        """A saved learner, rebuilt for ``classnames`` of ``dataset`` (whose ``template``, when the learner
        uses hand-crafted prompts); `MethodBase.load` is `vlprompt.load_prompt` for every method."""


def parse_options(method: str, options_cls: Optional[type], values: Optional[dict]):
    """``options_cls(**values)`` with every key and value checked; one error line names the bad one."""
    from ..config import coerce

    values = dict(values or {})
    if options_cls is None:
        if values:
            raise VlpromptError(f"method {method} takes no options (got {', '.join(sorted(values))})")
        return None
    hints = get_type_hints(options_cls)
    known = [f.name for f in dataclasses.fields(options_cls)]
    for key in values:
        if key not in known:
            raise VlpromptError(f"method {method}: unknown option '{key}' (known: {', '.join(known)})")
    coerced = {k: coerce(f"{method} option {k}", v, hints[k]) for k, v in values.items()}
    for key, value in coerced.items():  # no option means anything as inf or nan; they would surface mid-run
        if isinstance(value, float) and not math.isfinite(value):
            raise VlpromptError(f"method {method}: option {key} must be a finite number, got {values[key]!r}")
    return options_cls(**coerced)
