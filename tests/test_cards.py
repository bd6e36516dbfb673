"""Model cards rendered from real ``finetune.py`` outputs, and from folders this package did not train."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData

from hf_tissue_vit.cards import build_model_card, write_model_card
from hf_tissue_vit.constants import CLASS_DESCRIPTIONS, CLASS_NAMES


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoint-*"))
    return target


def _edit_results(run: Path, **changes) -> dict:
    path = run / "all_results.json"
    results = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            results.pop(key, None)
        else:
            results[key] = value
    path.write_text(json.dumps(results))
    return results


def test_card_of_a_real_run_states_what_the_run_recorded(trained_run_dir):
    results = json.loads((trained_run_dir / "all_results.json").read_text())
    card = build_model_card(trained_run_dir, "alice/tiny")
    meta, text = card.data.to_dict(), card.text
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "cc-by-4.0" and "hf_tissue_vit" in meta["tags"]
    assert set(meta["metrics"]) == {"accuracy", "f1"}
    # the split-size table comes from what training wrote (all_results["dataset"]["splits"])
    for split, n in results["dataset"]["splits"].items():
        assert f"| {split} | {n} |" in text
    assert f"Seed: {results['seed']}." in text
    for name in CLASS_NAMES:
        assert f"| {name} | {CLASS_DESCRIPTIONS[name]} |" in text
    (entry,) = meta["model-index"]
    metrics = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert metrics == {"accuracy": results["test_accuracy"], "f1": results["test_macro_f1"]}
    assert "trained with `hf_tissue_vit`" in text and "Not for diagnosis" in text
    assert "None" not in text and "Undefined" not in text


def test_unknown_values_are_left_out(trained_run_dir, tmp_path):
    run = _copy(trained_run_dir, tmp_path)
    _edit_results(run, seed=None, hardware=None, train_runtime=None, dataset=None, hyperparameters=None)
    text = build_model_card(run, "alice/tiny").text
    assert "Seed" not in text and "Hardware" not in text and "wall time" not in text
    assert "| split | tiles |" not in text and "hyperparameter" not in text
    assert "None" not in text
    assert not [line for line in text.splitlines() if re.search(r":\s*\.?$", line)]  # no "Seed: ." lines


def test_model_index_is_kept_for_unknown_dataset_name(trained_run_dir, tmp_path):
    """A run on the package's own dataset gets the Kather dataset name; its test split is named."""
    card = build_model_card(trained_run_dir)
    (entry,) = card.data.to_dict()["model-index"]
    assert entry["results"][0]["dataset"]["split"] == "test"


# --------------------------------------------------------------------------- a folder from plain Trainer
def _plain_trainer_folder(path: Path) -> tuple[Path, str]:
    """What transformers' example writes: save_pretrained + processor + its own card + eval results."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    (path / "all_results.json").write_text(json.dumps({"epoch": 3.0, "eval_accuracy": 0.75, "train_loss": 0.3}))
    data = ModelCardData(base_model="google/vit-base-patch16-224", datasets=["bob/tiles"], license="apache-2.0",
                         tags=["generated_from_trainer"])
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n# my model\n\nMy own words.\n")
    (path / "README.md").write_text(str(card))
    return path, str(card)


def test_users_card_is_kept_unless_asked(tmp_path):
    folder, original = _plain_trainer_folder(tmp_path / "plain")
    assert write_model_card(folder, "bob/plain") is None
    assert (folder / "README.md").read_text() == original
    assert not (folder / "README.user.md").exists()


def test_replacing_a_users_card_keeps_its_metadata_and_invents_nothing(tmp_path):
    folder, original = _plain_trainer_folder(tmp_path / "plain")
    path = write_model_card(folder, "bob/plain", replace_user_card=True)
    assert (folder / "README.user.md").read_text() == original  # the user's file is saved first
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["base_model"] == "google/vit-base-patch16-224" and meta["datasets"] == ["bob/tiles"]
    assert meta["license"] == "apache-2.0" and "generated_from_trainer" in meta["tags"]
    assert "hf_tissue_vit" not in meta["tags"] and "metrics" not in meta and "model-index" not in meta
    assert "trained with" not in card.text and "Kather" not in card.text and "150 × 150" not in card.text
    assert "| 2 | c |" in card.text and "google/vit-base-patch16-224" in card.text


def test_flags_fill_what_a_folder_does_not_say(tmp_path):
    folder, _ = _plain_trainer_folder(tmp_path / "plain")
    (folder / "README.md").unlink()
    card = build_model_card(folder, "bob/plain", base_model="facebook/deit-tiny-patch16-224",
                            dataset_id="bob/other")
    meta = card.data.to_dict()
    assert meta["base_model"] == "facebook/deit-tiny-patch16-224" and meta["datasets"] == ["bob/other"]
    assert "license" not in meta  # not ours: no licence is assumed


def test_rewriting_keeps_results_added_to_the_card(trained_run_dir, tmp_path):
    """Entries of the model-index that the run does not produce (e.g. from another tool) survive a re-render."""
    run = _copy(trained_run_dir, tmp_path)
    write_model_card(run, "alice/tiny")
    card = ModelCard.load(run / "README.md")
    index = card.data.to_dict()["model-index"]
    index[0]["results"].append({"task": {"type": "image-classification"},
                                "dataset": {"name": "CRC-VAL-HE-7K", "type": "crc-val-he-7k", "split": "test"},
                                "metrics": [{"type": "accuracy", "value": 0.5}]})
    card.data = ModelCardData(**{**card.data.to_dict(), "model-index": index})
    (run / "README.md").write_text(str(card))
    rewritten = ModelCard.load(write_model_card(run, "alice/tiny")).data.to_dict()["model-index"][0]["results"]
    assert {r["dataset"]["name"] for r in rewritten} == {"Kather 2016 colorectal cancer histology tiles",
                                                         "CRC-VAL-HE-7K"}


@pytest.mark.parametrize("bad", ["no-namespace", "a/b/c", "alice/bad name", ""])
def test_one_repo_id_check(bad):
    from hf_tissue_vit.hub import check_repo_id

    with pytest.raises(ValueError, match="--repo_id"):
        check_repo_id(bad)
    assert check_repo_id("alice/tiny") == "alice/tiny"


def test_a_card_this_package_wrote_is_rewritten_not_kept(tmp_path):
    """Also for a folder it did not train: its own card is recognised by the mark in the text."""
    folder, _ = _plain_trainer_folder(tmp_path / "plain")
    (folder / "README.md").unlink()
    first = write_model_card(folder, "bob/plain")
    assert first is not None and "hf_tissue_vit" not in ModelCard.load(first).data.to_dict().get("tags", [])
    second = write_model_card(folder, "bob/plain", space_id="bob/demo")
    assert second is not None and "https://huggingface.co/spaces/bob/demo" in second.read_text()
    assert not (folder / "README.user.md").exists()
