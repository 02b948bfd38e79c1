"""The guides in docs/ point at configs that exist and validate, tower sections included."""

import re
from pathlib import Path

import pytest

from mmalign.config import load_config
from mmalign.towers import TOWERS

ROOT = Path(__file__).parents[1]
GUIDES = ["image_text", "audio_text", "graph_text", "many_modalities", "pretrained_towers"]


def linked_configs(guide: str) -> list[Path]:
    text = (ROOT / "docs" / f"{guide}.md").read_text()
    return [ROOT / match for match in re.findall(r"\]\(\.\./(configs/[\w.]+\.yaml)\)", text)]


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_config_loads_and_every_tower_section_validates(guide: str) -> None:
    paths = linked_configs(guide)
    assert paths, f"docs/{guide}.md links no config"
    for path in paths:
        config = load_config(path)
        for name, tower in config.model.towers.items():
            assert type(tower) is TOWERS.get(tower.type).config_class, name


def test_readme_links_exist() -> None:
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|configs)/[^)#]+)\)", text)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing
