"""vlprompt: prompt tuning for frozen CLIP-like vision-language models.

    import vlprompt as vp
    bb = vp.load_backbone("ViT-B-16", weights="ViT-B-16.pt")
    ds = vp.load_dataset("caltech101", root, shots=16, seed=1)
    learner = vp.CoOp(bb, ds.classnames, n_ctx=16)
"""

__version__ = "0.1.0"

from .backbones import Backbone, load_backbone  # noqa: E402
from .config import RunConfig  # noqa: E402
from .data import DatasetSplits, Datum, list_datasets, load_dataset  # noqa: E402
from .errors import VlpromptError  # noqa: E402
from .methods import METHODS, CPTOptions, get_method, list_methods, load_prompt  # noqa: E402
from .methods.dualview import DualViewOptions  # noqa: E402
from .methods.kgcoop import KgCoOpOptions  # noqa: E402
from .presets import PRESETS  # noqa: E402
from .prompts import CoOp, ZeroShotCLIP  # noqa: E402
from .prompts.guided import GuidedCoOp  # noqa: E402
from .utils.allocator import keep_freed_memory  # noqa: E402


def run(cfg: "RunConfig", backbone=None) -> dict:
    """Run one configuration end to end (see `vlprompt.engine.run`)."""
    from .engine.run import run as _run

    return _run(cfg, backbone=backbone)


__all__ = ["Backbone", "CoOp", "CPTOptions", "DatasetSplits", "Datum", "DualViewOptions", "GuidedCoOp",
           "KgCoOpOptions", "METHODS", "PRESETS", "RunConfig", "VlpromptError", "ZeroShotCLIP", "get_method",
           "keep_freed_memory", "list_datasets", "list_methods", "load_backbone", "load_dataset", "load_prompt", "run",
           "__version__"]
