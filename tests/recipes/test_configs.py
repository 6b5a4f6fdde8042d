"""Every shipped recipe config parses through its recipe's own parser, so configs cannot rot."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

CONFIG_DIR = Path(__file__).parents[2] / "recipes" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_exist():
    assert any(path.name.startswith("phase1_") for path in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_yaml_parses(path, tmp_path):
    match = re.match(r"(phase\d|merge|eval|pipeline)", path.name)
    assert match, f"{path.name}: config names start with the recipe they belong to (phaseN_, merge_, eval_, pipeline_)"
    recipe = importlib.import_module(f"recipes.{match.group(1)}")
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    parsed = recipe.make_parser().parse_args_and_config(["--config", str(path), "--output_dir", str(tmp_path)])
    assert parsed, path.name


@pytest.mark.parametrize(
    ("recipe", "flag", "field"),
    [
        ("phase1", "--specializations", "CognateConfig.specializations"),
        ("phase2", "--fitness_weights", "EvoMergeConfig.fitness_weights"),
        ("phase3", "--reasoning_bake", "QuietStarConfig.reasoning_bake"),
        ("phase4", "--data_mixture", "BitNetConfig.data_mixture"),
        ("phase5", "--bake", "CurriculumConfig.bake"),
    ],
)
def test_a_malformed_json_field_on_the_command_line_names_the_field_and_the_fix(recipe, flag, field, tmp_path):
    config = next(path for path in CONFIGS if path.name.startswith(f"{recipe}_"))
    parser = importlib.import_module(f"recipes.{recipe}").make_parser()
    args = ["--config", str(config), "--output_dir", str(tmp_path), flag, "{corpus: 1"]
    with pytest.raises(ValueError, match=re.escape(f"{field} is not valid JSON")) as error:
        parser.parse_args_and_config(args)
    assert "Fix:" in str(error.value)


PARSED_RECIPES = sorted(p.stem for p in CONFIG_DIR.parent.glob("*.py") if "def make_parser" in p.read_text())


def test_the_argument_parsing_recipes_are_found():
    assert {"phase1", "phase2", "phase3", "phase4", "merge", "eval"} <= set(PARSED_RECIPES)


@pytest.mark.parametrize("recipe", PARSED_RECIPES)
def test_every_recipe_prints_its_help(recipe):
    """`--help` formats every field's help text (a bare `%` in one breaks argparse for the whole recipe)."""
    assert "--" in importlib.import_module(f"recipes.{recipe}").make_parser().format_help()
