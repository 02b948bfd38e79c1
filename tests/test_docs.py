"""The guides in docs/ point at configs that exist and validate, tower sections included, and
every ``mmalign`` command they show parses."""

import re
import shlex
from pathlib import Path

import pytest

from mmalign.cli.main import build_parser
from mmalign.config import load_config
from mmalign.config.loading import precheck_config
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


PLACEHOLDER = re.compile(r"^\[|\.\.\.|^[A-Z_]+$")
"""A word that stands for the reader's own value (``CONFIG``, ``[--modality image]``, ``...``)."""


def shell_commands(text: str) -> list[list[str]]:
    """The arguments of every ``mmalign`` command in the shell blocks of a markdown text
    (``mmalign ...``, ``.venv/bin/mmalign ...``, ``python -m mmalign ...``, after ``torchrun``
    or ``accelerate launch``), continuation lines joined, commands with placeholders left out."""
    found = []
    blocks = re.findall(r"^```(?:sh|bash|shell)[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        for part in re.split(r"\s*(?:&&|;|\|)\s*", line.strip()):
            words = shlex.split(part, comments=True)
            starts = [
                i + 1
                for i, word in enumerate(words)
                if word.endswith("mmalign") and (i == 0 or words[i - 1] == "-m" or "/" in word)
            ]
            if starts and not any(PLACEHOLDER.search(word) for word in words[starts[0] :]):
                found.append(words[starts[0] :])
    return found


def test_every_guide_command_parses_and_its_config_is_valid() -> None:
    """Each ``mmalign`` command of every guide and of the README, run or not by the guide
    tests (fsdp, multi_gpu, finetuning, terms, positives, tiled_losses, data_sources,
    pretrained_towers, DEMO...): its flags parse, and a ``train`` command's config exists and
    passes the checks made before torch loads, ``--set`` overrides and tower options
    included."""
    checked = 0
    for markdown in sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"]):
        for argv in shell_commands(markdown.read_text()):
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as exited:
                assert exited.code == 0, f"{markdown.name}: mmalign {' '.join(argv)}"
                continue
            if args.command == "train":
                precheck_config(ROOT / args.config, args.set)
            checked += 1
    assert checked >= 75, checked  # a guide losing its commands shows here
