"""Every registered method through the same sweep (timm's habit), on the tiny CLIP and on a small SigLIP: train a
step (or nothing to train), save, load through `vp.load_prompt`, evaluate to the same accuracy, transfer to other
class names where it declares it can (on SigLIP, the methods built on causal shortcuts are one line instead); plus the artefact format's rules (stored type, unknown keys, a crafted config). Formats 1 and 2:
test_legacy_formats.py."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import TINY_OPTIONS, siglip_arch, tiny_backbone

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.data.transforms import test_transform
from vlprompt.engine.evaluate import accuracy_report, classify, image_logits, rank_logits
from vlprompt.engine.features import encode_items
from vlprompt.engine.run import evaluate_prompt, run
from vlprompt.methods import METHODS
from vlprompt.prompts.artifact import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=4, seed=0)


@pytest.fixture(scope="module", params=["vlprompt-tiny-ViT", "siglip"])
def sweep(request, shapes, bb, tmp_path_factory):
    """(architecture, backbone, dataset, test features, labels) of each backbone the sweep runs over: the tiny CLIP,
    and a small SigLIP (bidirectional text tower, support.siglip_arch)."""
    arch, model = request.param, bb
    if arch == "siglip":
        if not os.environ.get("CI"):
            pytest.importorskip("transformers")  # its tokenizer; scripts/setup.sh installs it
        arch = siglip_arch(tmp_path_factory.mktemp("siglip"))
        model = tiny_backbone(arch)
    ds = vp.load_dataset(shapes)
    feats, labels = encode_items(model, ds.test, test_transform(**model.preprocess.test_args()), progress=False)
    return arch, model, ds, feats, labels


def train_one(method: str, shapes, out, bb, arch: str = "vlprompt-tiny-ViT", **kw):
    kw.setdefault("method_options", TINY_OPTIONS.get(method))
    cfg = vp.RunConfig.from_sources(dataset=shapes, method=method, backbone=arch, pretrained="random", shots=2,
                                    epochs=1, batch_size=8, output=str(out), progress=False, **kw)
    return run(cfg, backbone=bb)


def ranked(learner, ds, feats, n=None):
    """Ranked predictions of the first ``n`` test images: from the frozen features, or through the learner's own
    image tower when its image features depend on it."""
    if learner.from_pixels:
        logits, _ = image_logits(learner, ds.test[:n], progress=False)
        return rank_logits(logits, len(learner.classnames))
    return classify(learner, feats[:n])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_sweep(name, shapes, sweep, tmp_path):
    method = METHODS[name]
    arch, bb, ds, feats, labels = sweep
    m = train_one(name, shapes, tmp_path / name, bb, arch)
    assert m["method"] == name and m["task"] == ("prompt_classification" if method.trains else
                                                 "zeroshot_classification")
    if not method.trains:
        assert not (tmp_path / name / "prompt").exists()
        return
    saved = json.loads((tmp_path / name / "prompt" / CONFIG_NAME).read_text())
    assert saved["type"] == name and saved["format_version"] == FORMAT_VERSION == 3
    assert saved["vlprompt_version"] == vp.__version__
    assert set(saved["config"]) == {"options", "layout", "template", "dataset"}
    learner = vp.load_prompt(tmp_path / name, bb)
    assert learner.method == name and learner.method_config.artifact() == saved["config"]
    # the tensors are the learner's state_dict(), every one of them, exactly
    tensors = load_file(str(tmp_path / name / "prompt" / WEIGHTS_NAME))
    state = learner.state_dict()
    assert sorted(tensors) == sorted(state)
    assert all(torch.equal(tensors[k], state[k].cpu()) for k in state)
    again = accuracy_report(ranked(learner, ds, feats), labels, ds.classnames)
    assert again["accuracy"] == m["test"]["accuracy"] and again["per_class"] == m["test"]["per_class"]
    evaluated = evaluate_prompt(str(tmp_path / name), {}, output=str(tmp_path / f"{name}_eval"), backbone=bb)
    assert evaluated["test"]["accuracy"] == m["test"]["accuracy"] and evaluated["kind"] == "eval"
    new_names = ["teapot", "violin", "zebra"]
    if method.needs.transfers:
        moved = vp.load_prompt(tmp_path / name, bb, classnames=new_names)
        among_new = ranked(moved, ds, feats, 6)  # classified among the 3 new classes
        assert moved.classnames == new_names and among_new.shape == (6, 3) and int(among_new.max()) == 2
        assert type(moved) is type(learner)
    else:
        with pytest.raises(vp.VlpromptError):
            vp.load_prompt(tmp_path / name, bb, classnames=new_names)


def test_a_prompt_of_another_learner_is_refused_by_the_wrong_class(shapes, bb, tmp_path):
    train_one("kgcoop", shapes, tmp_path / "kg", bb, method_options={"ensemble_hand": 0.5})
    with pytest.raises(vp.VlpromptError, match="is a kgcoop prompt .*vlprompt.load_prompt"):
        vp.CoOp.from_pretrained(tmp_path / "kg" / "prompt", bb)  # would drop the inference blend
    kg = vp.load_prompt(tmp_path / "kg", bb)
    assert isinstance(kg, vp.GuidedCoOp) and kg.ensemble_hand == 0.5


def test_unknown_keys_from_a_newer_version_are_warned_about_and_ignored(shapes, bb, tmp_path):
    train_one("coop", shapes, tmp_path / "c", bb)
    path = tmp_path / "c" / "prompt" / CONFIG_NAME
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "vlprompt_version": "9.0", "shiny_new_field": 3}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = vp.load_prompt(tmp_path / "c", bb)
    said = [str(w.message) for w in caught]
    assert any("shiny_new_field" in s and "9.0" in s for s in said), said
    assert learner.classnames == cfg["classnames"]


def test_load_prompt_errors_are_one_line(shapes, bb, tmp_path):
    train_one("coop", shapes, tmp_path / "c", bb)
    shutil.copytree(tmp_path / "c" / "prompt", tmp_path / "odd")
    path = tmp_path / "odd" / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "type": "no_such_method"}))
    with pytest.raises(vp.VlpromptError, match="method 'no_such_method', which this vlprompt does not know"):
        vp.load_prompt(tmp_path / "odd", bb)
    with pytest.raises(vp.VlpromptError, match="trained on backbone 'vlprompt-tiny-ViT', not 'vlprompt-tiny-RN'"):
        vp.load_prompt(tmp_path / "c", tiny_backbone("vlprompt-tiny-RN"))
    csc = train_one("coop", shapes, tmp_path / "csc", bb, csc=True, n_ctx=2)
    same_count = [f"other {c}" for c in csc["data"]["classnames"]]
    with pytest.raises(vp.VlpromptError, match="class-specific context belongs to its own"):
        vp.load_prompt(tmp_path / "csc", bb, classnames=same_count)


@pytest.mark.parametrize("method, edit, why", [
    ("clip_adapter", lambda c, t: c["config"]["options"].update(reduction="many"), "option reduction: invalid value"),
    ("clip_adapter", lambda c, t: c["config"]["options"].update(shiny=1), "unknown option 'shiny'"),
    ("coop", lambda c, t: c["config"].update(options={"weight": 2}), "method coop takes no options"),
    ("coop", lambda c, t: c["config"]["layout"].update(n_ctx="4"), "field 'config.layout.n_ctx' has a value of the wrong"),
    ("coop", lambda c, t: c["config"]["layout"].update(csc=1), "field 'config.layout.csc'"),
    ("coop", lambda c, t: c["config"].update(extra=1), "field 'config' has unknown key 'extra'"),
    ("coop", lambda c, t: c["config"].update(template=3), "field 'config.template' must be a string"),
    ("coop", lambda c, t: c.update(config=[]), "field 'config' has a value of the wrong type"),
    ("coop", lambda c, t: c["config"]["layout"].update(class_token_position="left"), "class_token_position 'left'"),
    ("coop", lambda c, t: c["config"]["layout"].update(n_ctx=3), "first difference: ctx: saved (4, 64), expected (3, 64)"),
    ("coop", lambda c, t: t.update(extra=torch.zeros(2)), "first difference: extra: saved (2,), expected none"),
    ("clip_adapter", lambda c, t: t.pop("up.weight"), "first difference: up.weight: saved none"),
    ("tip_adapter", lambda c, t: t.update(keys=torch.zeros(3, 5)), "first difference: keys: saved (3, 5)"),
])
def test_a_crafted_format_3_prompt_is_one_error_line(shapes, bb, tmp_path, method, edit, why):
    train_one(method, shapes, tmp_path / "r", bb, n_ctx=4)
    folder = tmp_path / "r" / "prompt"
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    tensors = load_file(str(folder / WEIGHTS_NAME))
    edit(cfg, tensors)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    save_file(tensors, str(folder / WEIGHTS_NAME))
    with pytest.raises(vp.VlpromptError) as err:
        vp.load_prompt(tmp_path / "r", bb)
    message = str(err.value)
    assert "\n" not in message and why in message and str(folder) in message, message


def test_a_learner_built_directly_saves_what_it_was_built_with(bb, tmp_path):
    names = ["cat", "dog", "owl"]
    adapter = vp.get_method("clip_adapter")
    from vlprompt.methods.clip_adapter import ClipAdapter

    ClipAdapter(bb, names, ["art of a {}."], reduction=8, ratio=0.5).save_pretrained(tmp_path / "a")
    loaded = vp.load_prompt(tmp_path / "a", bb)
    assert (loaded.reduction, loaded.ratio, loaded.templates) == (8, 0.5, ["art of a {}."])
    assert loaded.method_config.options == adapter.Options(reduction=8, ratio=0.5)
    # an ensemble of templates comes from a dataset's template and name, which a learner built directly lacks
    with pytest.raises(vp.VlpromptError, match="built directly with 2 templates cannot be saved"):
        vp.GuidedCoOp(bb, names, ["a {}.", "b {}."], n_ctx=2, ctx_init=None).save_pretrained(tmp_path / "g")
