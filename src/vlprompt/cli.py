"""The ``vlprompt`` command: zeroshot, train, eval, study, report, datasets, methods, demo.

Every option maps to a `RunConfig` key (the same keys a ``--config`` YAML file may hold). Errors in the
user's input are printed as one line and exit with status 2, never as a stack trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Optional, Sequence

from .config import RunConfig
from .errors import VlpromptError
from .utils.allocator import keep_freed_memory


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise VlpromptError(f"{self.prog}: {message}")


def _flag(name: str) -> str:
    f = RunConfig.__dataclass_fields__[name]
    return f.metadata["flag"] if f.metadata.get("flag") is not None else "--" + name.replace("_", "-")


def _help(name: str) -> str:
    """A key's help text with its default, both from its declaration in `RunConfig`; a key that recipe cells
    set says which (so `--batch-size` does not claim 32 where the cocoop recipe makes it 1)."""
    f = RunConfig.__dataclass_fields__[name]
    text = f.metadata["help"]
    if name == "method":  # the registered methods, from the registry itself
        from .methods import METHODS

        text = f"{text}: {', '.join(METHODS)}"
    if f.type in ("bool", bool):
        return f"turn off: {text}" if f.default else text
    if f.default is None or f.default is dataclasses.MISSING:
        return text
    return f"{text} (default {f.default}{_set_by_recipes(name)})"


def _set_by_recipes(name: str) -> str:
    """``; the recipes of kgcoop, ... and of the base2new, xd protocols set their own: `vlprompt methods```, from
    the recipe table, or nothing when no cell sets ``name``."""
    from .recipes import ANY, table

    cells = [c for c in table() if name in c.values]
    methods = sorted({c.method for c in cells if c.method != ANY})
    protocols = [p for p in ("fewshot", "base2new", "xd", "dg") if any(c.method == ANY and c.protocol == p
                                                                       for c in cells)]
    parts = [f"of {', '.join(methods)}"] if methods else []
    parts += [f"of the {', '.join(protocols)} protocol{'s' if len(protocols) > 1 else ''}"] if protocols else []
    return f"; the recipes {' and '.join(parts)} set their own: `vlprompt methods`" if parts else ""


def _add_settings(p, group: str, skip: tuple = ()) -> None:
    """An option for every `RunConfig` key declared in ``group`` (values stay strings: RunConfig parses them)."""
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("group") != group or f.name in skip or f.metadata.get("flag") == "":
            continue
        if f.type in ("bool", bool):  # a switch away from the default
            p.add_argument(_flag(f.name), dest=f.name, action="store_const", const=not f.default, help=_help(f.name))
        else:
            p.add_argument(_flag(f.name), dest=f.name, metavar=f.name.upper(), help=_help(f.name))


def _add_data(p, only: Optional[tuple] = None) -> None:
    names = [f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("group") == "data"]
    _add_settings(p.add_argument_group("data"), "data", skip=tuple(n for n in names if only and n not in only))


def _add_backbone(p) -> None:
    _add_settings(p.add_argument_group("backbone"), "backbone")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with any of these options (command-line options win)")
    p.add_argument("--output", help=RunConfig.__dataclass_fields__["output"].metadata["help"])
    _add_execution(p)


def _add_execution(p) -> None:
    """How runs are carried out (never what they compute): workers, cache, checkpoints, progress."""
    _add_settings(p, "execution")
    _add_settings(p, "output")


def _add_coop(p: argparse.ArgumentParser, method: bool = True) -> None:
    g = p.add_argument_group("method, prompt and recipe (see `vlprompt methods`)")
    _add_settings(g, "method", skip=() if method else ("method", "protocol"))  # a study decides its protocol
    g.add_argument("--option", "-o", dest="method_options", action="append", metavar="KEY=VALUE",
                   help="a setting of the method, repeatable (see `vlprompt methods`)")
    _add_settings(g, "prompt")
    _add_settings(g, "recipe")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="vlprompt", description="Prompt tuning for frozen CLIP-like models.")
    parser.add_argument("--version", action="version", version=f"vlprompt {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("zeroshot", help="evaluate zero-shot CLIP with hand-crafted prompts")
    _add_data(p), _add_backbone(p), _add_run(p)
    p.add_argument("--ensemble", action="store_true", help="the 7-template ensemble (+ dataset template)")

    p = sub.add_parser("train", help="train a prompt (CoOp) and evaluate it on the test split")
    _add_data(p), _add_backbone(p), _add_run(p), _add_coop(p)

    p = sub.add_parser("eval", help="evaluate a saved prompt (run folder or prompt folder)")
    p.add_argument("prompt", help="a run folder written by `vlprompt train`, or its prompt/ folder")
    _add_data(p), _add_backbone(p), _add_run(p)

    p = sub.add_parser("study", help="run a protocol (fewshot, base2new, xd, dg) as one resumable study")
    studies = p.add_subparsers(dest="protocol", parser_class=_Parser, required=True)
    for protocol, text in STUDY_HELP.items():
        q = studies.add_parser(protocol, help=text)
        if protocol in ("xd", "dg"):
            q.add_argument("--source", help="the dataset prompts are trained on (default imagenet)")
            q.add_argument("--targets", help="comma-separated datasets to evaluate on (default: "
                           + ("the four ImageNet variants" if protocol == "dg" else "the other 10 CoOp datasets") + ")")
        else:
            q.add_argument("--datasets", required=True, help="comma-separated datasets (names or folders)")
        q.add_argument("--methods", help="comma-separated methods (default zeroshot,coop; see `vlprompt methods`)")
        q.add_argument("--shots", help="comma-separated shot counts (default "
                       + ("1,2,4,8,16" if protocol == "fewshot" else "16") + ")")
        q.add_argument("--seeds", help="comma-separated seeds (default 1,2,3)")
        _add_data(q, only=("root", "template"))
        _add_backbone(q), _add_study_run(q), _add_coop(q, method=False)
    q = studies.add_parser("run", help="a study from a YAML file (protocol, datasets, methods, shots, seeds, ...)")
    q.add_argument("file", help="the study definition (YAML)")
    _add_study_run(q)

    p = sub.add_parser("report", help="tables, plots and an HTML page from a study folder or a folder of runs")
    p.add_argument("folder", help="a study folder (with index.json) or any folder holding run folders")
    p.add_argument("--format", default="md", help="md (default) | csv | latex | json, printed to the terminal")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables only, no figures")

    p = sub.add_parser("datasets", help="list the known datasets, or check one on disk")
    p.add_argument("name", nargs="?", help="a registered name or a folder to check")
    p.add_argument("--root", help="data root (for registered names)")
    p.add_argument("--no-decode", action="store_true", help="only check that files exist (faster)")

    p = sub.add_parser("methods", help="list the methods and their options (--option KEY=VALUE)")
    p = sub.add_parser("demo", help="the built-in default job: zero-shot then CoOp on generated images")
    p.add_argument("--output", default="runs/demo", help="folder for the demo's runs (default runs/demo)")
    p.add_argument("--backbone", help="architecture when real weights are available (default ViT-B-16)")
    p.add_argument("--weights", help="local weights file for real accuracy (or set VLPROMPT_WEIGHTS)")
    p.add_argument("--epochs", type=int, default=None, help="CoOp epochs (default: the paper's 200 for the tiny model, 20 for real-size models)")
    p.add_argument("--quiet", action="store_true")
    from .practice.commands import add_commands; add_commands(sub, _Parser)
    return parser


STUDY_HELP = {
    "fewshot": "few-shot curves: every dataset x method x shots x seed (zero-shot methods once per dataset)",
    "base2new": "base-to-new: train on the base half, evaluate on base and on new classes, H per dataset",
    "xd": "cross-dataset: train once on the source, evaluate on every target with its own classes",
    "dg": "domain generalisation: train on ImageNet, evaluate on ImageNet-V2/-Sketch/-A/-R",
}


def _add_study_run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("study")
    g.add_argument("--output", help="study folder (default studies/<protocol>)")
    g.add_argument("--retry-failed", dest="retry_failed", action="store_true", help="run failed runs again")
    g.add_argument("--rerun", action="store_true", help="run everything again, finished runs included")
    g.add_argument("--wait", action="store_true", help="when another process is running this study folder, wait "
                   "for it to finish and then continue (default: refuse, naming it)")
    g.add_argument("--executor", default="local", choices=["local", "pool", "ray"],
                   help="local: runs one after another in this process | pool: worker processes on this machine | "
                   'ray: a Ray cluster (pip install "vlprompt[ray]")')
    g.add_argument("--workers", type=int, help="pool: worker processes (default 2) | ray: workers (default: as many "
                   "as the cluster's resources fit)")
    g.add_argument("--threads-per-worker", dest="threads_per_worker", type=int,
                   help="pool: most threads of each worker's runs (default: the cores divided among the workers)")
    g.add_argument("--gpus", help="pool: GPU ids, e.g. 0,1 (one worker per GPU and --runs-per-gpu)")
    g.add_argument("--runs-per-gpu", dest="runs_per_gpu", type=int, help="pool: runs at once on each GPU (default 1)")
    g.add_argument("--max-retries", dest="max_retries", type=int,
                   help="pool, ray: times a unit whose worker died is given again (default 1)")
    g.add_argument("--address", help="ray: an existing cluster (auto, or host:port; default: start one here)")
    g.add_argument("--cpus-per-run", dest="cpus_per_run", type=float, help="ray: CPUs each run holds (default 1)")
    g.add_argument("--gpus-per-run", dest="gpus_per_run", type=float,
                   help="ray: GPUs each run holds, a fraction packs runs on one GPU (default 0)")
    _add_execution(g)


# Every RunConfig key is an option of the same name where a command defines one (``progress`` is --quiet).
CONFIG_KEYS = tuple(RunConfig.keys())
EXECUTION_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("group") == "execution")


def _key_values(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise VlpromptError(f"--option {pair!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = value
    return out


def _overrides(args: argparse.Namespace) -> dict:
    values = {k: getattr(args, k) for k in CONFIG_KEYS if getattr(args, k, None) is not None}
    if "method_options" in values:
        values["method_options"] = _key_values(values["method_options"])
    return values


def _config(args: argparse.Namespace, **forced):
    return RunConfig.from_sources(getattr(args, "config", None), **{**_overrides(args), **forced})


def _print_result(metrics: dict) -> None:
    test = metrics["test"]
    print(f"{metrics['method']:<18} {metrics['dataset']:<16} top-1 {test['accuracy']:6.2f}%  "
          f"macro {test['macro_accuracy']:6.2f}%  ({test['n']} test images)")


def cmd_zeroshot(args) -> int:
    from .engine.run import run

    cfg = _config(args, method="zeroshot_ensemble" if args.ensemble else "zeroshot")
    _print_result(run(cfg))
    return 0


def _int_list(name: str, text: Optional[str]) -> Optional[list[int]]:
    """``"1,2,4"`` -> [1, 2, 4]; None or a single value -> None (an ordinary single run)."""
    if text is None or "," not in str(text):
        return None
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise VlpromptError(f"--{name}: expected a number or a comma-separated list, got {text!r}") from None


def cmd_train(args) -> int:
    from .engine.run import run
    from .methods import get_method
    from .protocols.grid import run_grid

    shots, seeds = _int_list("shots", args.shots), _int_list("seed", args.seed)
    if shots or seeds:  # a grid: one process, one model load, one feature cache
        args.shots = None if shots else args.shots
        args.seed = None if seeds else args.seed
    cfg = _config(args)
    if not get_method(cfg.method).trains:
        raise VlpromptError(f"method '{cfg.method}' does not train; use `vlprompt zeroshot`")
    if not (shots or seeds):
        _print_result(run(cfg))
        return 0
    results = run_grid(cfg, shots or [cfg.shots], seeds or [cfg.seed])
    for m in results:
        _print_result(m)
    print(f"{'shots':>6} {'seeds':>6} {'mean top-1 %':>13} {'std':>6}")
    for k in shots or [cfg.shots]:
        accs = [m["test"]["accuracy"] for m in results if m["data"]["shots"] == k]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
        print(f"{k:>6} {len(accs):>6} {mean:13.2f} {std:6.2f}")
    return 0


def cmd_eval(args) -> int:
    from .config import load_yaml
    from .engine.run import evaluate_prompt

    overrides = load_yaml(args.config) if args.config else {}
    overrides.update(_overrides(args))
    output = overrides.pop("output", None)
    metrics = evaluate_prompt(args.prompt, overrides, output=output)
    _print_result(metrics)
    print(f"-> {metrics['output']}")
    return 0


def cmd_datasets(args) -> int:
    from .data import DATASETS, check_dataset

    if not args.name:
        print(f"{'name':<16} {'folder':<22} template")
        for name, spec in DATASETS.items():
            print(f"{name:<16} {spec.dir:<22} {spec.template}")
        return 0
    report = check_dataset(args.name, args.root, decode=not args.no_decode)
    print(json.dumps(report, indent=2))
    return 0 if report.get("ok", not report.get("missing") and not report.get("unreadable")) else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(output=args.output, backbone=args.backbone, weights=args.weights, epochs=args.epochs,
             progress=not args.quiet)
    return 0


def cmd_methods(args) -> int:
    """Every method: what it needs, its options (``--option KEY=VALUE``) and its recipe cells."""
    from .methods import METHODS

    for name, method in METHODS.items():
        print(f"{name}  ({method.needs.describe()})")
        for f in dataclasses.fields(method.Options) if method.Options else ():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f.metadata.get("help", "")
            print(f"    {f.name} = {default!r}" + (f"  # {text}" if text else ""))
        for line in recipe_lines(name):
            print(f"    {line}")
    return 0


def recipe_lines(method: str) -> list[str]:
    """The recipe cells a method's runs get, one entry per cell (protocols sharing a cell together): the
    protocols, the dataset, the cell (its name for ``--preset``), whether it is reconstructed, its values and
    its source; the protocols' settings for methods without a cell of their own on one line. Any value is
    overridden by the run's own settings (docs/recipes.md)."""
    from .recipes import ANY, cells_of

    groups: dict = {}
    for protocol, cell in cells_of(method):
        groups.setdefault(cell.id, (cell, []))[1].append(protocol)
    lines, shared = [], {}
    for cell, protocols in groups.values():
        where = ", ".join(dict.fromkeys(protocols)) + ("" if cell.dataset == ANY else f" on {cell.dataset}")
        if cell.method == ANY:
            shared.setdefault(cell.describe(), []).append(where)
            continue
        how = [f"--preset {cell.name}" if cell.name else "", "only when named" if cell.alternative else "",
               "RECONSTRUCTED" if cell.reconstructed else ""]
        lines.append(f"recipe {where}: cell {cell.id} ({'; '.join(h for h in how if h) or 'official'})")
        lines.append(f"    values: {cell.describe()}")
        lines.append(f"    source: {cell.source}")
    if shared:
        protocols = ", ".join(w for ws in shared.values() for w in ws)
        lines.append(f"recipe {protocols}: no recipe of its own, CoOp's setting for the protocol (cells "
                     "any/PROTOCOL/any, RECONSTRUCTED): " + "; ".join(f"{', '.join(ws)}: {values}"
                                                                      for values, ws in shared.items()))
    return lines


def _csv_list(name: str, text: Optional[str], kind=str) -> list:
    if not text:
        return []
    try:
        return [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise VlpromptError(f"--{name}: expected a comma-separated list of numbers, got {text!r}") from None


def _study_spec(args):
    """A StudySpec from a study subcommand's options: every train option becomes a shared setting, and each
    ``--option KEY=VALUE`` goes to the methods that have that option."""
    from .methods import get_method
    from .protocols.study import MethodSpec, StudySpec

    settings = _overrides(args)
    for key in ("output", "progress", "shots", "seed", "dataset", "protocol"):  # the study's own, not shared
        settings.pop(key, None)
    options = settings.pop("method_options", {})
    preset = settings.pop("preset", None)
    methods = [MethodSpec(name, preset=preset if get_method(name).trains else None)
               for name in _csv_list("methods", args.methods or "zeroshot,coop")]
    for key, value in options.items():
        takers = [m for m in methods if get_method(m.method).Options
                  and key in {f.name for f in dataclasses.fields(get_method(m.method).Options)}]
        if not takers:
            raise VlpromptError(f"--option {key}: no method of this study has that option (see `vlprompt methods`)")
        for m in takers:
            m.options[key] = value
    return StudySpec(protocol=args.protocol, methods=methods,
                     datasets=_csv_list("datasets", getattr(args, "datasets", None)),
                     source=getattr(args, "source", None),
                     targets=_csv_list("targets", getattr(args, "targets", None)),
                     shots=_csv_list("shots", args.shots, int),
                     seeds=_csv_list("seeds", args.seeds, int) or [1, 2, 3], settings=settings)


def cmd_study(args) -> int:
    from .protocols.report import to_markdown, write_report
    from .protocols.study import load_study_file, run_study

    spec = load_study_file(args.file) if args.protocol == "run" else _study_spec(args)
    if args.protocol == "run":
        for key in EXECUTION_KEYS:
            if getattr(args, key, None) is not None:
                spec.settings[key] = getattr(args, key)
    folder = args.output or spec.output or f"studies/{spec.protocol}"
    options = {k: getattr(args, k) for k in ("workers", "threads_per_worker", "runs_per_gpu", "max_retries",
                                             "address", "cpus_per_run", "gpus_per_run")
               if getattr(args, k, None) is not None}
    if getattr(args, "gpus", None):
        options["gpus"] = _csv_list("gpus", args.gpus, int)
    result = run_study(spec, folder, retry_failed=args.retry_failed, rerun=args.rerun,
                       progress=args.progress is not False, wait=args.wait, executor=args.executor, **options)
    rows, out = write_report(folder)
    print(to_markdown(rows))
    print(f"report: {out / 'index.html'} (tables, figures); `vlprompt report {folder}` prints it again")
    for uid, error in result.failed:
        print(f"failed: {uid}: {error}")
    return 1 if result.failed else 0


def cmd_report(args) -> int:
    from .protocols.report import FORMATS, RENDER, write_report

    if args.format not in FORMATS:
        raise VlpromptError(f"--format: '{args.format}' is not one of {list(FORMATS)}")
    rows, out = write_report(args.folder, plots=args.plots)
    sys.stdout.write(RENDER[args.format](rows))
    print(f"report written to {out} (index.html, tables.*{', figures' if args.plots else ''})", file=sys.stderr)
    return 0


COMMANDS = {"methods": cmd_methods, "zeroshot": cmd_zeroshot, "train": cmd_train, "eval": cmd_eval, "datasets": cmd_datasets,
            "demo": cmd_demo, "study": cmd_study, "report": cmd_report}
from .practice.commands import COMMANDS as _PRACTICE; COMMANDS.update(_PRACTICE)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"vlprompt: warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.showwarning = _show_warning  # one plain line, not the source line that raised it
    keep_freed_memory()  # large activations reuse the heap instead of fresh, page-faulted mappings
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        from .utils.progress import configure_cli_logging  # vlprompt's log lines on stderr, bare
        configure_cli_logging(quiet=getattr(args, "quiet", False) or getattr(args, "progress", None) is False)
        if not args.command:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except VlpromptError as exc:
        print(f"vlprompt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlprompt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`vlprompt methods | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
