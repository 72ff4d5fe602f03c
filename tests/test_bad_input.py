"""Bad input: each case is one error line naming the thing, exit status 2, and nothing written; plus the CoOp
fidelity rules for ``ctx_init`` and accuracies from integer counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import TINY_VIT, tiny_backbone, write_old_prompt

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.evaluate import accuracy_report

TINY = ["--backbone", TINY_VIT, "--pretrained", "random"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=3,
                                  n_test_per_class=2, seed=0)


def one_error(capsys, argv, *words) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert len(err) == 1 and err[0].startswith("vlprompt: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]


def written(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def train_argv(shapes, out, *extra) -> list[str]:
    return ["train", "--dataset", shapes, *TINY, "--shots", "2", "--epochs", "1", "--quiet", "--output", str(out),
            *extra]


@pytest.mark.parametrize("extra, words", [
    (["--seed", "-1"], ["seed", "-1"]),
    (["--device", "tpu"], ["device", "tpu"]),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["device", "cuda"]),
    (["--lr", "inf"], ["lr", "inf"]),
    (["--weight-decay", "nan"], ["weight_decay", "nan"]),
    (["--ctx-init-rule", "letters"], ["ctx_init_rule", "letters"]),
    (["--resume", "maybe"], ["resume", "maybe"]),
])
def test_bad_settings_are_one_line_before_any_work(extra, words, shapes, tmp_path, capsys):
    one_error(capsys, train_argv(shapes, tmp_path / "runs" / "r", *extra), *words)
    assert written(tmp_path) == []


def test_a_yaml_file_that_is_not_utf8(shapes, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("template: 'une photo d\u2019un {}.'\n".encode("cp1252"))
    one_error(capsys, train_argv(shapes, tmp_path / "runs" / "r", "--config", str(cfg)), str(cfg), "UTF-8")
    assert written(tmp_path / "runs") == []


@pytest.mark.parametrize("content, words", [
    (b"", ["empty", "0 bytes"]),
    ("strings", ["not a state dict of tensors", "'a'", "str"]),
])
def test_bad_weights_files(content, words, shapes, tmp_path, capsys):
    path = tmp_path / "w.pt"
    if content == "strings":
        torch.save({"a": "x", "b": "y"}, str(path))
    else:
        path.write_bytes(content)
    one_error(capsys, ["zeroshot", "--dataset", shapes, "--backbone", TINY_VIT, "--weights", str(path), "--quiet",
                       "--output", str(tmp_path / "o")], str(path), *words)
    assert not (tmp_path / "o").exists()


def test_a_non_finite_loss_stops_the_run_with_one_line(shapes, tmp_path, capsys, monkeypatch):
    from vlprompt.methods.coop import CoOpObjective

    real = CoOpObjective.loss

    def exploding(self, learner, batch):
        loss, terms = real(self, learner, batch)
        return loss * float("nan"), terms

    monkeypatch.setattr(CoOpObjective, "loss", exploding)
    one_error(capsys, train_argv(shapes, tmp_path / "runs" / "r"), "loss is nan", "epoch 1, step 1")
    assert written(tmp_path / "runs") == []  # no all-NaN prompt reported as a run


def test_a_prompt_on_other_weights_of_the_same_architecture_is_refused(shapes, tmp_path, capsys):
    trained_on, weights = tmp_path / "a.pt", tmp_path / "other.pt"
    torch.save(tiny_backbone().model.state_dict(), str(trained_on))
    torch.save(tiny_backbone(random_init_seed=7).model.state_dict(), str(weights))  # same widths, other weights
    argv = train_argv(shapes, tmp_path / "run")
    argv[argv.index("--pretrained"):argv.index("--pretrained") + 2] = ["--weights", str(trained_on)]
    assert main(argv) == 0
    capsys.readouterr()
    one_error(capsys, ["eval", str(tmp_path / "run"), "--weights", str(weights), "--quiet",
                       "--output", str(tmp_path / "ev")], "other weights", "fingerprint")
    assert not (tmp_path / "ev").exists()


def test_a_class_specific_context_on_other_names_of_the_same_length(shapes, bb, tmp_path):
    cfg = vp.RunConfig.from_sources(dataset=shapes, backbone=TINY_VIT, pretrained="random", shots=2, epochs=1,
                                    csc=True, output=str(tmp_path / "r"), progress=False)
    vp.run(cfg, backbone=bb)
    names = json.loads((tmp_path / "r" / "prompt" / "prompt_config.json").read_text())["classnames"]
    renamed = names[::-1]
    assert len(renamed) == len(names) and renamed != names
    with pytest.raises(vp.VlpromptError, match="class-specific context belongs to its own"):
        vp.load_prompt(str(tmp_path / "r" / "prompt"), bb, classnames=renamed)
    assert vp.load_prompt(str(tmp_path / "r" / "prompt"), bb, classnames=names).classnames == names


def test_more_shots_than_images_is_said_and_recorded(shapes, bb, tmp_path):
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="zeroshot", backbone=TINY_VIT, pretrained="random",
                                    shots=50, output=str(tmp_path / "r"), progress=False)
    with pytest.warns(UserWarning, match="shots=50: .* classes have fewer training images"):
        m = vp.run(cfg, backbone=bb)
    assert m["data"]["classes_short_of_shots"] == m["data"]["num_classes"]
    assert any(d["key"] == "data" and "shots=50" in d["detail"] for d in m["deviations"])


def test_an_unreadable_test_image_is_found_before_training(shapes, tmp_path, capsys, monkeypatch):
    import shutil

    from vlprompt.engine import run as run_mod

    root = tmp_path / "d"
    shutil.copytree(shapes, root)
    victim = sorted((root / "test").rglob("*.png"))[-1]
    victim.write_bytes(b"\x89PNG broken")
    trained = []
    monkeypatch.setattr(run_mod, "train_prompt", lambda *a, **k: trained.append(1))
    one_error(capsys, train_argv(str(root), tmp_path / "runs" / "r"), str(victim))
    assert trained == [] and written(tmp_path / "runs") == []


# -- CoOp fidelity: ctx_init as the official code reads it ------------------------------------------------------

def test_ctx_init_underscores_are_spaces_and_one_vector_per_word(bb):
    names = ["cat", "dog"]
    official = vp.CoOp(bb, names, ctx_init="a_photo_of_a")
    spaced = vp.CoOp(bb, names, ctx_init="a photo of a")
    assert official.n_ctx == 4 and official.ctx_init == "a photo of a"
    assert torch.equal(official.ctx, spaced.ctx) and torch.equal(official.text_features(), spaced.text_features())
    assert vp.CoOp(bb, names, ctx_init="a_photo_of_a", ctx_init_rule="tokens").n_ctx == bb.bpe_length("a_photo_of_a")


def test_a_word_of_several_tokens_learns_one_vector_and_keeps_the_rest_frozen(bb):
    phrase = "itap of a"
    n_bpe = bb.bpe_length(phrase)
    assert n_bpe > 3  # "itap" is more than one BPE token
    learner = vp.CoOp(bb, ["cat", "dog"], ctx_init=phrase)
    assert learner.n_ctx == 3
    tokens = bb.tokenize([f"{phrase} cat."])
    with torch.no_grad():
        emb = bb.text.token_embedding(tokens).float()[0]
    assert torch.equal(learner.ctx, emb[1:4])  # the first three token embeddings are learned
    # the rest of the phrase stays frozen in front of the class name, as in the official code
    assert torch.equal(learner.token_suffix[0, : n_bpe - 3], emb[4:1 + n_bpe])
    # and the prompt is the phrase's own embedding sequence before any training
    assert torch.equal(learner.prompt_embeddings()[0], emb)
    per_token = vp.CoOp(bb, ["cat", "dog"], ctx_init=phrase, ctx_init_rule="tokens")
    assert per_token.n_ctx == n_bpe and torch.equal(per_token.prompt_embeddings()[0], emb)
    with pytest.raises(vp.VlpromptError, match="only fits the 'end' class position"):
        vp.CoOp(bb, ["cat"], ctx_init=phrase, class_token_position="front")


def test_the_rule_is_recorded_and_old_prompts_load_per_token(bb, tmp_path):
    learner = vp.CoOp(bb, ["cat", "dog"], ctx_init="itap of a")
    learner.save_pretrained(tmp_path / "p")
    cfg_path = tmp_path / "p" / "prompt_config.json"
    layout = json.loads(cfg_path.read_text())["config"]["layout"]
    assert layout["ctx_init_rule"] == "words" and layout["n_ctx"] == 3
    assert vp.load_prompt(str(tmp_path / "p"), bb).n_ctx == 3
    old = vp.CoOp(bb, ["cat", "dog"], ctx_init="itap of a", ctx_init_rule="tokens")
    write_old_prompt(old, tmp_path / "old", drop=("ctx_init_rule",))  # as written before the rule was recorded
    loaded = vp.load_prompt(str(tmp_path / "old"), bb)
    assert loaded.n_ctx == old.n_ctx and torch.equal(loaded.text_features(), old.text_features())


def test_accuracies_are_exact_fractions_of_integer_counts():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 1, 0, 2])
    report = accuracy_report(preds, labels, ["a", "b", "c"])
    assert report["correct"] == 4 and report["accuracy"] == 100.0 * 4 / 7
    assert report["per_class"] == {"a": 100.0 / 3, "b": 200.0 / 3, "c": 100.0}
