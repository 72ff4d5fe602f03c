"""ProGrad (BeierZhu/Prompt-align): CoOp whose cross-entropy gradient is projected away from the direction that
conflicts with the zero-shot teacher's.

    L_ce = CE(student logits, y)
    L_kd = T^2 mean_b sum_c -p_zs,c log softmax(s / T)_c     (p_zs: softmax of zero-shot CLIP's logits / T)
    per parameter tensor: G = G_ce - lambda (G_ce . G_kd / |G_kd|^2) G_kd  if cos(G_ce, G_kd) < 0, else G_ce

The KD gradient itself is never applied: it only defines what is removed from G_ce. The teacher is zero-shot
CLIP with the dataset's hand-crafted template (ProGrad's own templates differ for five datasets,
docs/reconstructions.md: recorded as a deviation), and the student is the CoOp learner with CoOp's options (ProGrad
initialises the last W context vectors from its template's words and the others at zero: not reproduced,
recorded). Inference: the student's logits only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import VlpromptError
from ..prompts.zeroshot import handcrafted_text_features
from ..recipes.records import Deviation
from .base import Objective, option
from .coop import CoOpMethod


@dataclass
class ProGradOptions:
    lam: float = option(1.0, "lambda: 1 = full projection (ProGrad's default; its README: 0.8 for some 8/16-shot runs)")
    temperature: float = option(1.0, "T of the distillation term (ProGrad: 1.0)")

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise VlpromptError(f"option lam: must be in [0, 1], got {self.lam}")
        if not self.temperature > 0:
            raise VlpromptError(f"option temperature: must be > 0, got {self.temperature}")


def project(g_ce: torch.Tensor, g_kd: torch.Tensor, lam: float) -> torch.Tensor:
    """ProGrad's rule for one parameter tensor (flattened dot products)."""
    dot = float((g_ce * g_kd).sum())
    if dot >= 0:  # cos >= 0: no conflict
        return g_ce
    return g_ce - lam * dot / float((g_kd * g_kd).sum()) * g_kd


class ProGradObjective(Objective):
    def __init__(self, options: ProGradOptions, teacher_text: torch.Tensor, template: str):
        super().__init__(options)
        self.teacher_text, self.template = teacher_text, template

    def loss(self, learner, batch):
        f = batch.views["weak"]
        logits = learner(f)
        ce = F.cross_entropy(logits, batch.labels)
        t = self.options.temperature
        with torch.no_grad():
            teacher = learner.logits(f, self.teacher_text)
        kd = t * t * (-(F.softmax(teacher / t, dim=-1) * F.log_softmax(logits / t, dim=-1)).sum(-1)).mean()
        return ce, {"loss": ce.detach(), "ce": ce.detach(), "kd": kd, "logits": logits.detach()}

    def backward(self, params, loss, terms) -> None:
        """`Objective.backward`: each parameter's CE gradient, projected against its KD gradient."""
        g_kd = torch.autograd.grad(terms["kd"], params, retain_graph=True)
        g_ce = torch.autograd.grad(loss, params)
        for p, ce, kd in zip(params, g_ce, g_kd):
            p.grad = project(ce, kd, self.options.lam)

    @property
    def deviations(self) -> list[Deviation]:
        return [Deviation("prograd.init", f"CoOp's options, template '{self.template}'",
                          "16 vectors: the last from its own per-dataset template's words, the others at zero",
                          "official code", "the teacher's template and the context's initialisation")]


class ProGradMethod(CoOpMethod):
    """The CoOp learner trained with ProGrad's projected gradient; saved prompts say method "prograd"."""

    name = "prograd"
    Options = ProGradOptions

    def objective(self, learner, config) -> ProGradObjective:
        teacher = handcrafted_text_features(learner.backbone, learner.classnames, [config.template]).clone().float()
        return ProGradObjective(config.options, teacher, config.template)
