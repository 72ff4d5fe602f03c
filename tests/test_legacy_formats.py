"""Prompts of formats 1 and 2 (each learner's settings as top-level fields, tensors under names of their own), as
the learners wrote them before format 3 (`support.write_old_prompt`), load through `vp.load_prompt` to the learner
that wrote them: the same tensors, the same hand-crafted templates, the same predictions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from support import TINY_OPTIONS, write_old_prompt

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.data.transforms import test_transform
from vlprompt.engine.evaluate import classify
from vlprompt.engine.features import encode_items
from vlprompt.engine.run import run
from vlprompt.prompts.zeroshot import handcrafted_text_features

OPTIONS = {"kgcoop": {"ensemble_hand": 0.5, "hand_templates": "ensemble"},
           "clip_adapter": {"reduction": 8, "ratio": 0.3}}
METHODS = ("coop", "kgcoop", "cocoop", "clip_adapter", "linear_probe", "tip_adapter")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=4, seed=0)


@pytest.fixture(scope="module")
def features(shapes, bb):
    ds = vp.load_dataset(shapes)
    feats, _ = encode_items(bb, ds.test, test_transform(bb.image_size, bb.image_mean, bb.image_std), progress=False)
    return feats


@pytest.fixture(scope="module")
def trained(shapes, bb, tmp_path_factory):
    """method -> the learner a run saved (loaded back from its format 3 artefact)."""
    out = {}
    for method in METHODS:
        folder = tmp_path_factory.mktemp(method)
        cfg = vp.RunConfig.from_sources(dataset=shapes, method=method, backbone="vlprompt-tiny-ViT",
                                        pretrained="random", shots=2, epochs=1, batch_size=8, n_ctx=4,
                                        csc=method == "coop", method_options=OPTIONS.get(method),
                                        output=str(folder / "run"), progress=False)
        run(cfg, backbone=bb)
        out[method] = vp.load_prompt(folder / "run", bb)
    return out


# Format 1 predates every learner but CoOp and GuidedCoOp (the "learner" field came with the baselines).
@pytest.mark.parametrize("method, version", [(m, 2) for m in METHODS] + [("coop", 1), ("kgcoop", 1)])
def test_an_old_prompt_loads_as_the_learner_that_wrote_it(trained, bb, features, tmp_path, method, version):
    learner = trained[method]
    loaded = vp.load_prompt(write_old_prompt(learner, tmp_path / "old", version), bb)
    assert type(loaded) is type(learner) and loaded.method == method and loaded.classnames == learner.classnames
    state, again = learner.state_dict(), loaded.state_dict()
    assert sorted(state) == sorted(again) and all(torch.equal(state[k], again[k]) for k in state)
    assert getattr(loaded, "templates", None) == getattr(learner, "templates", None)
    assert torch.equal(classify(loaded, features), classify(learner, features))
    if method in ("tip_adapter", "linear_probe"):  # learned numbers, exactly
        names = ("alpha", "beta") if method == "tip_adapter" else ("c",)
        assert all(getattr(loaded, n) == getattr(learner, n) is not None for n in names)
    # saved again, it is a format 3 prompt of the same learner
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "prompt_config.json").read_text())["format_version"] == 3
    assert torch.equal(classify(vp.load_prompt(tmp_path / "new", bb), features), classify(learner, features))


def test_a_format_2_prompt_uses_the_templates_it_stored(trained, bb, tmp_path):
    kg = trained["kgcoop"]
    assert len(kg.templates) == 8  # the ensemble view
    folder = write_old_prompt(kg, tmp_path / "old")
    path = folder / "prompt_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "templates": ["art of a {}.", "a sketch of a {}."]}))
    loaded = vp.load_prompt(folder, bb)
    assert loaded.templates == ["art of a {}.", "a sketch of a {}."]
    assert torch.allclose(loaded.hand, handcrafted_text_features(bb, kg.classnames, loaded.templates), atol=1e-6)
    # on another dataset the view follows that dataset's template, as the prompt's hand_view says
    target = SimpleNamespace(name="other", template="a drawing of a {}.")
    moved = vp.load_prompt(folder, bb, dataset=target)
    assert len(moved.templates) == 8 and moved.templates[-1] == "a drawing of a {}."
    # format 1 did not record how its view follows a dataset: it keeps its templates
    write_old_prompt(kg, tmp_path / "v1", version=1, drop=("hand_view",))
    assert vp.load_prompt(tmp_path / "v1", bb, dataset=target).templates == kg.templates


def test_old_transfer_refusals_are_one_line(trained, bb, tmp_path):
    for method, why in (("coop", "class-specific context belongs to its own"),
                        ("linear_probe", "a linear probe is a head"),
                        ("tip_adapter", "a Tip-Adapter cache holds labels")):
        folder = write_old_prompt(trained[method], tmp_path / method)
        with pytest.raises(vp.VlpromptError, match=why):
            vp.load_prompt(folder, bb, classnames=[f"other {c}" for c in trained[method].classnames])


def test_an_old_prompt_missing_a_tensor_is_one_error_line(trained, bb, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_old_prompt(trained["clip_adapter"], tmp_path / "old")
    tensors = load_file(str(folder / "prompt.safetensors"))
    save_file({"down": tensors["down"]}, str(folder / "prompt.safetensors"))
    with pytest.raises(vp.VlpromptError, match="holds no 'up' tensor"):
        vp.load_prompt(folder, bb)


def test_an_old_deep_prompt_loads(shapes, bb, features, tmp_path):
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="deep_language", backbone="vlprompt-tiny-ViT",
                                    pretrained="random", shots=2, epochs=1, batch_size=8,
                                    method_options=TINY_OPTIONS["deep_language"], output=str(tmp_path / "run"),
                                    progress=False)
    run(cfg, backbone=bb)
    learner = vp.load_prompt(tmp_path / "run", bb)
    loaded = vp.load_prompt(write_old_prompt(learner, tmp_path / "old"), bb)
    assert loaded.options == learner.options
    assert torch.equal(classify(loaded, features), classify(learner, features))
