"""Recipes as data: the shipped table loads and is checked, the most specific cell wins, one merge order
(defaults < cell < file < command line; in studies cell < settings < overrides < unit), the cell a run used is
recorded, and deviations are records rendered by one function."""

import importlib
import json

import pytest

import vlprompt as vp
from vlprompt.data.synthetic import make_synthetic_dataset
from vlprompt.engine.run import config_key, run
from vlprompt.protocols.study import MethodSpec, StudySpec, run_config
from vlprompt.recipes import (ANY, PROTOCOLS, Deviation, as_records, cells_of, default_cell, parse_table, render,
                              resolve, table, words_of)

TINY = dict(backbone="vlprompt-tiny-ViT", pretrained="random")
IVLP = {"n_ctx_text": 2, "n_ctx_vision": 2, "depth_text": 12, "depth_vision": 12, "ctx_init": "a photo of a"}


def cell(**kw):
    return {"method": "coop", "protocol": "fewshot", "dataset": "any", "values": {}, "source": "s",
            "reconstructed": False, **kw}


# -- the table ------------------------------------------------------------------------------------------------

def test_the_shipped_table_loads_and_every_cell_is_complete():
    cells = table()
    assert cells and all(c.source and c.method and c.protocol in (*PROTOCOLS, ANY) for c in cells)
    assert not any("SPEC" in c.source for c in cells)  # sources in the project's words
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    for protocol in PROTOCOLS:  # every method gets a cell under every protocol
        assert default_cell("any_method_at_all", protocol).method == ANY


@pytest.mark.parametrize("bad, message", [
    ({"cells": [cell(values={"lr2": 1})]}, "values: unknown key 'lr2'"),
    ({"cells": [cell(values={"output": "x"})]}, "values: 'output' is not a recipe setting"),
    ({"cells": [cell(protocol="fewshots")]}, "protocol: 'fewshots' is not one of"),
    ({"cells": [cell(dataset="caltech")]}, "dataset: 'caltech' is not a registered dataset"),
    ({"cells": [cell(values={"lr": "fast"})]}, "lr: invalid value 'fast'"),
    ({"cells": [cell(values={"lr": -1})]}, "lr: must be a finite number > 0"),
    ({"cells": [cell(reconstructed="yes")]}, "reconstructed: expected true or false"),
    ({"cells": [cell(), cell()]}, "a second cell for this method, protocol and dataset"),
    ({"cells": [cell(name="a"), cell(protocol="xd", name="a")]}, "name: 'a' is also the name of cell"),
    ({"cells": [cell(alternative=True)]}, "an alternative cell needs a name"),
    ({"cells": [cell(colour=1)]}, "unknown key 'colour'"),
    ({"cells": [cell(official={"precision": 16})]}, "official: expected a mapping"),
    ({"rows": []}, "expected a mapping with a list 'cells'"),
])
def test_a_bad_table_is_one_clear_error(bad, message):
    with pytest.raises(vp.VlpromptError, match="recipe table") as err:
        parse_table(bad, "recipe table t.yaml")
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_the_most_specific_cell_wins(monkeypatch):
    cells = parse_table({"cells": [
        cell(method="any", values={"n_ctx": 1}),
        cell(method="m", protocol="any", values={"n_ctx": 2}),
        cell(method="m", values={"n_ctx": 3}),
        cell(method="m", dataset="dtd", values={"n_ctx": 4}),
        cell(method="m", protocol="any", dataset="eurosat", values={"n_ctx": 5}),
        cell(method="m", name="alt", alternative=True, values={"n_ctx": 6}),
    ]}, "t")
    monkeypatch.setattr(importlib.import_module("vlprompt.recipes.table"), "table", lambda: cells)
    got = {(p, d): default_cell("m", p, d).values["n_ctx"] for p in ("fewshot", "xd") for d in ("dtd", "eurosat",
                                                                                                  "any")}
    # method+protocol+dataset > method+protocol > method+dataset > method > any method
    assert got == {("fewshot", "dtd"): 4, ("fewshot", "eurosat"): 3, ("fewshot", "any"): 3,
                   ("xd", "dtd"): 2, ("xd", "eurosat"): 5, ("xd", "any"): 2}
    assert default_cell("other", "fewshot", "dtd").values["n_ctx"] == 1
    assert resolve({"method": "m", "dataset": "dtd"})["n_ctx"] == 4
    assert resolve({"method": "m", "preset": "alt"})["n_ctx"] == 6  # an alternative only when named
    assert resolve({"method": "m", "preset": "m/any/eurosat"})["n_ctx"] == 5  # a cell's id works as a name
    assert "n_ctx" not in resolve({"method": "m", "preset": "none"})


# -- the cells that replace the presets and the protocol defaults --------------------------------------------

def test_cells_hold_what_the_presets_and_protocol_defaults_held():
    coop = vp.RunConfig.from_sources(method="coop")
    assert (coop.backbone, coop.n_ctx, coop.ctx_init, coop.batch_size, coop.epochs, coop.preset) == \
        ("RN50", 16, None, 32, None, None)
    for protocol in ("base2new", "xd", "dg"):
        for method in ("coop", "cpt", "zeroshot", "linear_probe"):
            cfg = vp.RunConfig.from_sources(method=method, protocol=protocol)
            assert (cfg.backbone, cfg.n_ctx, cfg.ctx_init) == ("ViT-B-16", 4, "a photo of a"), (method, protocol)
    for name, batch, epochs in (("kgcoop", 128, 100), ("dualview_mi", 128, 100), ("cocoop", 1, 10)):
        for protocol in PROTOCOLS:
            cfg = vp.RunConfig.from_sources(method=name, protocol=protocol)
            assert (cfg.backbone, cfg.n_ctx, cfg.ctx_init, cfg.batch_size, cfg.epochs, cfg.preset) == \
                ("ViT-B-16", 4, "a photo of a", batch, epochs, name)
    assert default_cell("dualview_mi", "base2new").reconstructed and not default_cell("kgcoop", "xd").reconstructed


@pytest.mark.parametrize("method, options, lr", [
    ("ivlp", IVLP, 0.0035),
    ("deep_language", {"n_ctx_text": 4, "depth_text": 12, "ctx_init": "a photo of a"}, 0.0025),
    ("vpt_deep", {"n_ctx_vision": 8, "depth_vision": 12, "text_template": "a photo of a {}."}, 0.0025),
])
def test_deep_prompt_cells(method, options, lr):
    for protocol in ("base2new", "xd", "dg", "fewshot"):
        c = default_cell(method, protocol)
        assert c.method == method and c.options == options, protocol
        want = {"backbone": "ViT-B-16", "batch_size": 4, "lr": lr, "epochs": 5}
        assert {k: c.values[k] for k in want} == want
        assert c.reconstructed == (protocol == "fewshot") and c.values.get("shots") == (
            None if protocol == "fewshot" else 16)
    assert default_cell("vpt_deep", "base2new").official == {"precision": "fp32", "prompt_precision": "fp32"}


def test_the_named_ivlp_alternative():
    alt = vp.RunConfig.from_sources(method="ivlp", preset="ivlp-4+4", subsample="base")
    assert (alt.lr, alt.epochs, alt.batch_size) == (0.0025, 20, 4)
    assert alt.method_options == {"n_ctx_text": 4, "n_ctx_vision": 4, "depth_text": 9, "depth_vision": 9,
                                  "ctx_init": "a photo of a"}
    default = vp.RunConfig.from_sources(method="ivlp", subsample="base")  # the alternative is never the default
    assert (default.lr, default.method_options) == (0.0035, IVLP)
    with pytest.raises(vp.VlpromptError, match="recipe cell ivlp-4\\+4: method coop takes no options"):
        vp.RunConfig.from_sources(method="coop", preset="ivlp-4+4")


# -- one merge order ----------------------------------------------------------------------------------------

def test_every_value_is_overridable_in_the_documented_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: ivlp\nprotocol: base2new\nlr: 0.01\nepochs: 7\nmethod_options: {depth_text: 9}\n")
    cfg = vp.RunConfig.from_sources(str(path), epochs=3, method_options={"depth_vision": 6})
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.01, 3, 4)  # file over cell, command line over file
    assert cfg.method_options == {**IVLP, "depth_text": 9, "depth_vision": 6}  # options key by key
    assert cfg.protocol == "base2new" and cfg.preset is None


def test_the_protocol_is_inferred_or_given():
    assert vp.RunConfig.from_sources(subsample="base").backbone == "ViT-B-16"  # base -> base2new
    assert vp.RunConfig.from_sources(subsample="all").backbone == "RN50"  # fewshot
    assert vp.RunConfig.from_sources(protocol="xd").n_ctx == 4
    with pytest.raises(vp.VlpromptError, match="protocol: 'b2n' is not one of"):
        vp.RunConfig(protocol="b2n")
    # the protocol picks a cell whose values the config then holds: not part of a run's identity
    a = vp.RunConfig.from_sources(subsample="base").to_dict()
    assert config_key(a) == config_key({**a, "protocol": "base2new"})


def test_a_study_unit_resolves_cell_then_settings_then_overrides():
    spec = StudySpec("base2new", [MethodSpec("kgcoop", options={"weight": 2.0}, overrides={"epochs": 3})],
                     datasets=["caltech101"], settings={"batch_size": 8, "epochs": 50})
    cfg = run_config(spec, spec.methods[0], dataset="caltech101", shots=16, seed=1, subsample="base")
    assert (cfg.backbone, cfg.batch_size, cfg.epochs, cfg.preset, cfg.protocol) == ("ViT-B-16", 8, 3, "kgcoop",
                                                                                   "base2new")
    assert cfg.method_options == {"weight": 2.0}
    spec = StudySpec("xd", [MethodSpec("ivlp", options={"depth_text": 3})], settings={"epochs": 1})
    cfg = run_config(spec, spec.methods[0], dataset="imagenet", shots=16, seed=1)
    assert cfg.method_options == {**IVLP, "depth_text": 3} and (cfg.lr, cfg.epochs) == (0.0035, 1)
    with pytest.raises(vp.VlpromptError, match="'protocol' is set by the study itself"):
        StudySpec("xd", [MethodSpec("coop")], settings={"protocol": "fewshot"})


# -- records ---------------------------------------------------------------------------------------------------

def test_records_render_to_words_by_one_function():
    assert render(Deviation("epochs", 2, 100, "kgcoop recipe")) == "epochs=2 (kgcoop recipe: 100)"
    assert render(Deviation("train_mode", "feature_bank", "exact", "paper", "3 views")) == \
        "train_mode=feature_bank (paper: exact): 3 views"
    assert render(Deviation("recipe", "x", None, "our reconstruction")) == "recipe=x (our reconstruction)"
    assert render(Deviation("data", detail="sorted")) == "data: sorted"
    assert render(Deviation("cpt.reconstruction", {"a": 1.0, "b": True})) == "cpt.reconstruction=a=1.0, b=true"
    rec = as_records([Deviation("k", 1, 2, "s"), "plain words", {"key": "x", "value": 3}], key="m")
    assert [r["key"] for r in rec] == ["k", "m", "x"] and set(rec[0]) == {"key", "value", "reference", "source",
                                                                          "detail", "words"}
    assert rec[1]["detail"] == "plain words" and words_of("plain words") == "plain words"  # earlier run folders
    assert words_of(rec[0]) == "k=1 (s: 2)"


def test_a_run_records_its_cell_and_its_deviations_as_records(tmp_path):
    data = tmp_path / "d"
    make_synthetic_dataset(str(data), n_train_per_class=2, n_test_per_class=2, seed=3)
    cfg = vp.RunConfig.from_sources(dataset=str(data), method="coop", subsample="base", shots=2, epochs=1, lr=0.01,
                                    output=str(tmp_path / "r"), progress=False, **TINY)
    m = run(cfg)
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    recipe = saved["recipe"]
    assert recipe["cell"] == {"method": "coop", "protocol": "base2new", "dataset": "any", "name": None}
    assert recipe["protocol"] == "base2new" and recipe["protocol_inferred"] and not recipe["reconstructed"]
    assert recipe["values"] == {"backbone": "ViT-B-16", "shots": 16, "n_ctx": 4, "ctx_init": "a photo of a"}
    assert recipe["reference"] == recipe["source"] and (recipe["epochs"], recipe["lr"]) == (1, 0.01)  # old keys
    devs = {d["key"]: d for d in m["deviations"]}
    assert (devs["lr"]["value"], devs["lr"]["reference"], devs["lr"]["source"]) == (0.01, 0.002, "coop base2new recipe")
    assert (devs["shots"]["value"], devs["shots"]["reference"]) == (2, 16)
    assert (devs["backbone"]["value"], devs["backbone"]["reference"]) == ("vlprompt-tiny-ViT", "ViT-B-16")
    assert devs["backbone.random"]["value"] is True and "n_ctx" not in devs  # ctx_init fixes M
    assert all(d["words"] == render(Deviation.from_dict(d)) for d in m["deviations"])


def test_methods_lists_the_recipe_cells(capsys):
    from vlprompt.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    block = out.split("\nivlp ")[1].split("\n" + "deep_language")[0] if "\nivlp " in out else ""
    for protocol, c in cells_of("ivlp"):
        assert f"cell {c.id}" in block
    assert "--preset ivlp-4+4; only when named" in block and "RECONSTRUCTED" in block
    assert "    recipe fewshot, base2new, xd, dg: cell kgcoop (--preset kgcoop)" in out


def test_reports_read_records_and_the_plain_strings_of_earlier_run_folders(tmp_path):
    from types import SimpleNamespace

    from vlprompt.protocols.report import deviation_summary
    from vlprompt.protocols.store import run_facts

    record = Deviation("epochs", 2, 100, "kgcoop recipe").to_dict()
    new = run_facts({"deviations": [record], "recipe": {"cell_id": "kgcoop"}}, {}, tmp_path / "none.json")
    old = run_facts({"deviations": ["epochs=1 (paper recipe for 4 shots: 100)"], "recipe": {}}, {},
                    tmp_path / "none.json")
    assert new["recipe_cell"] == "kgcoop" and old["recipe_cell"] is None
    runs = [SimpleNamespace(method="kgcoop", facts=new), SimpleNamespace(method="coop", facts=old),
            SimpleNamespace(method="kgcoop", facts=new)]
    summary = deviation_summary(runs, ["coop", "kgcoop"])
    assert summary == [
        {"words": "epochs=1 (paper recipe for 4 shots: 100)", "key": "note", "runs": 1, "methods": ["coop"]},
        {"words": "epochs=2 (kgcoop recipe: 100)", "key": "epochs", "runs": 2, "methods": ["kgcoop"]}]
