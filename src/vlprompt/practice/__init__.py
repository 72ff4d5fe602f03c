"""Using a trained prompt: ``vlprompt predict`` (classify image files), ``vlprompt export`` (the classifier as a
plain linear head, optionally one ONNX graph with the image tower) and ``vlprompt interpret`` (the nearest
vocabulary words of each learned context vector).

A prompt is a run folder written by ``vlprompt train`` or its ``prompt/`` folder, resolved exactly as
``vlprompt eval`` resolves it (`vlprompt.engine.run.eval_config`): the backbone is the one the prompt recorded,
and ``--weights`` may say where its weights file lives now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import VlpromptError


@dataclass
class OpenedPrompt:
    """A saved prompt loaded for use: its learner, the backbone it runs on and where it came from."""

    learner: object  # the method's learner (`vlprompt.load_prompt`)
    backbone: object  # `vlprompt.Backbone`
    config: object  # the RunConfig `vlprompt eval` would use (backbone, precision, test batch size, ...)
    path: Path  # the prompt folder
    prompt_config: dict  # its prompt_config.json
    method: str


def _no_prompt_reason(prompt: Path) -> Optional[str]:
    """Why ``prompt`` holds no saved prompt, for a run folder of a method that does not train (zero-shot)."""
    if not prompt.is_dir() or (prompt / "prompt").is_dir() or (prompt / "prompt_config.json").is_file():
        return None
    if not (prompt / "config.yaml").is_file():
        return None
    from ..config import load_yaml
    from ..methods import METHODS

    try:
        method = load_yaml(str(prompt / "config.yaml")).get("method")
    except VlpromptError:
        return None
    if method in METHODS and not METHODS[method].trains:
        return (f"{prompt} is a {method} run: zero-shot CLIP has no learned prompt or head to use "
                "(only trained runs have a prompt/ folder)")
    return None


def open_prompt(prompt, overrides: Optional[dict] = None, classnames: Optional[Sequence[str]] = None) -> OpenedPrompt:
    """Load the prompt at ``prompt`` (a run folder or its prompt/ folder) on the backbone it recorded.

    ``overrides``: backbone settings as `vlprompt eval` takes them (``weights``, ``pretrained``, ``backbone``,
    ``precision``, ``device``; None values are ignored). ``classnames`` rebuilds the prompt for other classes
    where the method can transfer; otherwise the refusal is one error line (`vlprompt.load_prompt`)."""
    from ..engine.run import backbone_from_config, eval_config
    from ..methods import load_prompt
    from ..prompts.artifact import read_artifact

    why = _no_prompt_reason(Path(prompt))
    if why:
        raise VlpromptError(why)
    cfg, path = eval_config(prompt, {k: v for k, v in (overrides or {}).items() if v is not None})
    pcfg, _ = read_artifact(path)
    bb = backbone_from_config(cfg)
    learner = load_prompt(path, bb, classnames=list(classnames) if classnames is not None else None)
    return OpenedPrompt(learner, bb, cfg, path, pcfg, cfg.method)


MAX_CLASSNAMES_BYTES = 16 * 1024 * 1024  # ~a million names; far above any label space


def parse_classnames(text: Optional[str] = None, file: Optional[str] = None) -> Optional[list[str]]:
    """Class names from ``--classnames a,b,c`` or ``--classnames-file FILE`` (one per line, blank lines
    skipped); None when neither is given."""
    if text is not None and file is not None:
        raise VlpromptError("give --classnames or --classnames-file, not both")
    if text is None and file is None:
        return None
    if file is not None:
        try:
            size = Path(file).expanduser().stat().st_size
            if size > MAX_CLASSNAMES_BYTES:
                raise VlpromptError(f"class names file {file}: {size:,} bytes, more than the "
                                    f"{MAX_CLASSNAMES_BYTES:,} a list of class names may have")
            lines = Path(file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise VlpromptError(f"cannot read class names file {file}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
        for number, line in enumerate(lines, 1):
            bad = next((c for c in line if ord(c) < 32 and c != "\t"), None)
            if bad is not None:  # a NUL or other control byte: a binary or damaged file, not names
                raise VlpromptError(f"class names file {file}, line {number}: control character {bad!r}")
        names, where = [line.strip() for line in lines if line.strip()], f"--classnames-file {file}"
    else:
        names, where = [n.strip() for n in text.split(",") if n.strip()], "--classnames"
    if not names:
        raise VlpromptError(f"{where}: no class names given")
    seen: set = set()
    for name in names:
        if name in seen:
            raise VlpromptError(f"{where}: class name {name!r} is given twice")
        seen.add(name)
    return names


__all__ = ["OpenedPrompt", "open_prompt", "parse_classnames"]
