"""Model cards: generated, valid HF front matter, and kept in step with the configs (`zoo card --check`)."""
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import zoo
from zoo.cards import check_cards, render_card
from zoo.cli import main

CARDS = Path(__file__).resolve().parents[1] / "model_cards"


def test_every_variant_has_an_up_to_date_card(capsys):
    assert main(["card", "--check", "--dir", str(CARDS)]) == 0
    assert f"all {len(zoo.list_models())} cards" in capsys.readouterr().out


@pytest.mark.parametrize("name", zoo.list_models())
def test_card_front_matter_parses(name):
    card = ModelCard((CARDS / f"{name}.md").read_text())
    cfg = zoo.get_config(name)
    data = card.data.to_dict()
    assert data["library_name"] == "hybridnorm-zoo" and data["license"] == "apache-2.0"
    assert cfg.norm_strategy in data["tags"] and ("moe" if cfg.is_moe else "dense") in data["tags"]
    st = zoo.stats(name, flops=False)
    assert f"{st.total_params:,} total" in card.text and f"{st.active_params:,} active" in card.text
    assert "zhuo2025hybridnorm" in card.text and f'zoo.build("{name}")' in card.text


def test_check_catches_a_card_out_of_date_with_its_config(tmp_path, capsys):
    shutil.copytree(CARDS, tmp_path / "cards")
    stale = tmp_path / "cards" / "tiny-dense-prenorm.md"
    stale.write_text(stale.read_text().replace("| layers | 4 |", "| layers | 6 |"))
    (tmp_path / "cards" / "tiny-moe-prenorm.md").unlink()
    assert main(["card", "--check", "--dir", str(tmp_path / "cards")]) == 1
    err = capsys.readouterr().err
    assert "tiny-dense-prenorm.md" in err and "tiny-moe-prenorm.md" in err and "2 of" in err
    assert check_cards(tmp_path / "cards", ["tiny-dense-hybridnorm"]) == []


def test_measured_results_flow_into_model_index(tmp_path):
    results = {"val_loss": 1.2345678, "train_loss": 1.1, "tokens": 1000, "dataset": "python-stdlib", "recipe": "AdamW"}
    card = ModelCard(render_card("tiny-dense-hybridnorm", results=results))
    (result,) = card.data.eval_results
    assert result.metric_type == "loss" and result.metric_value == 1.2346 and result.dataset_split == "validation"
    assert card.data.datasets == ["python-stdlib"] and "Trained by the zoo's recipe: AdamW." in card.text
