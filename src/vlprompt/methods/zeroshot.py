"""Zero-shot CLIP baselines: the dataset's hand-crafted template, or the 7-template ensemble."""

from __future__ import annotations

from typing import Sequence

from ..errors import VlpromptError
from ..prompts.templates import ensemble_templates
from ..prompts.zeroshot import ZeroShotCLIP
from .base import MethodBase, Needs


class ZeroShotMethod(MethodBase):
    needs = Needs(trains=False)

    def __init__(self, ensemble: bool):
        self.ensemble = ensemble
        self.name = "zeroshot_ensemble" if ensemble else "zeroshot"

    def build(self, backbone, classnames: Sequence[str], cfg, dataset) -> ZeroShotCLIP:
        template = cfg.template or dataset.template
        templates = ensemble_templates(template, dataset.name) if self.ensemble else [template]
        return ZeroShotCLIP(backbone, classnames, templates)

    def objective(self, learner, cfg, dataset):
        raise VlpromptError(f"method {self.name} has nothing to train")

    def load(self, path, backbone, classnames, dataset=None, template=None):
        raise VlpromptError(f"method {self.name} has no saved prompt to load")
