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

    def build(self, backbone, classnames: Sequence[str], config) -> ZeroShotCLIP:
        templates = ensemble_templates(config.template, config.dataset) if self.ensemble else [config.template]
        return ZeroShotCLIP(backbone, classnames, templates)

    def objective(self, learner, config):
        raise VlpromptError(f"method {self.name} has nothing to train")
