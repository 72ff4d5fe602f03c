"""The ``vlprompt predict``, ``export`` and ``interpret`` subcommands (wired into `vlprompt.cli`).

`add_commands` adds their parsers to the ``vlprompt`` subparsers; `COMMANDS` maps each name to a function of
the parsed arguments that returns the exit status. Bad input is a `VlpromptError`: one line, exit status 2.
"""

from __future__ import annotations

import sys

PROMPT_HELP = "a run folder written by `vlprompt train`, or its prompt/ folder (as `vlprompt eval`)"


def _add_backbone(p, precision: bool = True) -> None:
    g = p.add_argument_group("backbone (default: the one the prompt recorded)")
    g.add_argument("--weights", help="local weights file of the recorded backbone (where it lives now)")
    g.add_argument("--backbone", help="the recorded architecture (another one is an error)")
    g.add_argument("--pretrained", help="open_clip pretrained tag (needs a reachable hub), or 'random'")
    if precision:
        g.add_argument("--precision", help="fp32 | bf16 | auto for the frozen encoders (default: the run's)")
        g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run's)")


def _add_classnames(p) -> None:
    g = p.add_argument_group("classes (default: the prompt's own)")
    g.add_argument("--classnames", help="comma-separated class names (methods that transfer to new classes)")
    g.add_argument("--classnames-file", dest="classnames_file", help="a file with one class name per line")


def add_commands(sub, parser_class=None) -> None:
    """Add ``predict``, ``export`` and ``interpret`` to ``sub`` (the subparsers of the ``vlprompt`` parser).
    ``parser_class`` (vlprompt.cli's parser, whose errors are one line) builds the three parsers; None: the
    class ``sub`` was made with."""
    saved = sub._parser_class
    if parser_class is not None:
        sub._parser_class = parser_class  # argparse keeps it there; add_parser() has no per-call choice
    try:
        _add_parsers(sub)
    finally:
        sub._parser_class = saved


def _add_parsers(sub) -> None:
    p = sub.add_parser("predict", help="classify image files with a saved prompt (top-k classes, probabilities)")
    p.add_argument("prompt", help=PROMPT_HELP)
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--top-k", dest="top_k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--format", default="table", help="table (default) | csv | json")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help="images per encoder batch (default: the run's test batch size)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_classnames(p)
    _add_backbone(p)

    p = sub.add_parser("export", help="write a prompt's classifier as a linear head (safetensors + JSON, "
                       "optionally ONNX)")
    p.add_argument("prompt", help=PROMPT_HELP)
    p.add_argument("--output", "-o", required=True, help="folder for head.safetensors, head.json (and model.onnx)")
    p.add_argument("--onnx", action="store_true", help="also model.onnx: image tower + normalisation + head "
                   "(needs `pip install vlprompt[export]`)")
    _add_classnames(p)
    _add_backbone(p, precision=False)

    p = sub.add_parser("interpret", help="nearest vocabulary words of each learned context vector (CoOp's "
                       "interpret_prompt)")
    p.add_argument("prompt", help=PROMPT_HELP)
    p.add_argument("--top-k", dest="top_k", type=int, default=5, help="words per context vector (default 5)")
    p.add_argument("--format", default="table", help="table (default) | json")
    _add_backbone(p, precision=False)


def _backbone_overrides(args, fp32_cpu: bool = False) -> dict:
    keys = ("weights", "backbone", "pretrained", "precision", "device")
    values = {k: getattr(args, k, None) for k in keys}
    if fp32_cpu:  # exact float32 tensors: the exported head and graph, the token embedding
        values.update(precision="fp32", device="cpu")
    return {k: v for k, v in values.items() if v is not None}


def cmd_predict(args) -> int:
    from ..errors import VlpromptError
    from ..utils.progress import say
    from . import open_prompt, parse_classnames
    from .predict import FORMATS, collect_images, predict, render

    if args.format not in FORMATS:
        raise VlpromptError(f"--format: '{args.format}' is not one of {list(FORMATS)}")
    if args.top_k < 1:
        raise VlpromptError(f"--top-k: must be >= 1, got {args.top_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise VlpromptError(f"--batch-size: must be >= 1, got {args.batch_size}")
    classnames = parse_classnames(args.classnames, args.classnames_file)
    paths = collect_images(args.images)  # a missing image fails before the model is loaded
    opened = open_prompt(args.prompt, _backbone_overrides(args), classnames=classnames)
    progress = not args.quiet
    say(f"{opened.method} prompt {opened.path}: {len(opened.learner.classnames)} classes, backbone "
        f"{opened.backbone.source.describe()} ({opened.backbone.precision})", progress)
    records = predict(opened, paths, top_k=args.top_k,
                      batch_size=args.batch_size or opened.config.test_batch_size, progress=progress)
    meta = {"prompt": str(opened.path), "method": opened.method, "num_classes": len(opened.learner.classnames),
            "top_k": min(args.top_k, len(opened.learner.classnames)),
            "backbone": opened.backbone.source.describe(), "precision": opened.backbone.precision}
    sys.stdout.write(render(records, args.format, meta))
    return 0


def cmd_export(args) -> int:
    from . import open_prompt, parse_classnames
    from .export import HEAD_CONFIG, HEAD_WEIGHTS, ONNX_NAME, _require_onnx, export_head

    if args.onnx:
        _require_onnx()  # before the model is loaded
    classnames = parse_classnames(args.classnames, args.classnames_file)
    opened = open_prompt(args.prompt, _backbone_overrides(args, fp32_cpu=True), classnames=classnames)
    out = export_head(opened, args.output, onnx=args.onnx)
    files = [HEAD_WEIGHTS, HEAD_CONFIG] + ([ONNX_NAME] if args.onnx else [])
    print(f"{opened.method}: {len(opened.learner.classnames)} classes -> {out} ({', '.join(files)})")
    return 0


def cmd_interpret(args) -> int:
    from ..errors import VlpromptError
    from . import open_prompt
    from .interpret import FORMATS, interpret, render

    if args.format not in FORMATS:
        raise VlpromptError(f"--format: '{args.format}' is not one of {list(FORMATS)}")
    if args.top_k < 1:
        raise VlpromptError(f"--top-k: must be >= 1, got {args.top_k}")
    opened = open_prompt(args.prompt, _backbone_overrides(args, fp32_cpu=True))
    sys.stdout.write(render(interpret(opened, args.top_k), args.format))
    return 0


COMMANDS = {"predict": cmd_predict, "export": cmd_export, "interpret": cmd_interpret}
