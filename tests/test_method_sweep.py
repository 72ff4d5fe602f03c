"""Every registered method through the same sweep (timm's habit): train a step (or nothing to train), save,
load through `vp.load_prompt`, evaluate to the same accuracy, transfer to other class names where it declares
it can; plus the artefact format's rules (stored type, old format, unknown keys)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from support import TINY_OPTIONS, tiny_backbone

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.data.transforms import test_transform
from vlprompt.engine.evaluate import accuracy_report, classify, image_logits, rank_logits
from vlprompt.engine.features import encode_items
from vlprompt.engine.run import evaluate_prompt, run
from vlprompt.methods import METHODS
from vlprompt.prompts.coop import CONFIG_NAME, FORMAT_VERSION


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=4, seed=0)


@pytest.fixture(scope="module")
def bb():
    return tiny_backbone()


@pytest.fixture(scope="module")
def test_features(shapes, bb):
    ds = vp.load_dataset(shapes)
    feats, labels = encode_items(bb, ds.test, test_transform(bb.image_size, bb.image_mean, bb.image_std),
                                 progress=False)
    return ds, feats, labels


def train_one(method: str, shapes, out, bb, **kw):
    kw.setdefault("method_options", TINY_OPTIONS.get(method))
    cfg = vp.RunConfig.from_sources(dataset=shapes, method=method, backbone="vlprompt-tiny-ViT",
                                    pretrained="random", shots=2, epochs=1, batch_size=8, output=str(out),
                                    progress=False, **kw)
    return run(cfg, backbone=bb)


def ranked(learner, ds, feats, n=None):
    """Ranked predictions of the first ``n`` test images: from the frozen features, or through the learner's own
    image tower when its image features depend on it."""
    if learner.from_pixels:
        logits, _ = image_logits(learner, ds.test[:n], progress=False)
        return rank_logits(logits, len(learner.classnames))
    return classify(learner, feats[:n])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_sweep(name, shapes, bb, test_features, tmp_path):
    method = METHODS[name]
    ds, feats, labels = test_features
    m = train_one(name, shapes, tmp_path / name, bb)
    assert m["method"] == name and m["task"] == ("prompt_classification" if method.trains else
                                                 "zeroshot_classification")
    if not method.trains:
        assert not (tmp_path / name / "prompt").exists()
        return
    saved = json.loads((tmp_path / name / "prompt" / CONFIG_NAME).read_text())
    assert saved["type"] == name and saved["format_version"] == FORMAT_VERSION
    assert saved["vlprompt_version"] == vp.__version__
    learner = vp.load_prompt(tmp_path / name, bb)
    assert learner.method == name
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


def test_format_1_prompts_still_load(shapes, bb, test_features, tmp_path):
    """A prompt as the previous vlprompt wrote it: no type, learner or version fields."""
    ds, feats, labels = test_features
    for method in ("coop", "kgcoop"):
        m = train_one(method, shapes, tmp_path / method, bb)
        path = tmp_path / method / "prompt" / CONFIG_NAME
        cfg = json.loads(path.read_text())
        for key in ("type", "learner", "format_version", "vlprompt_version"):
            cfg.pop(key)
        path.write_text(json.dumps(cfg))
        learner = vp.load_prompt(tmp_path / method, bb)
        assert type(learner).__name__ == ("GuidedCoOp" if method == "kgcoop" else "CoOp")
        assert accuracy_report(classify(learner, feats), labels, ds.classnames)["accuracy"] == m["test"]["accuracy"]


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
