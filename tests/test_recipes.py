"""Every shipped recipe, phase by phase, passes the checks `--check` runs before it reads a
checkpoint: the strict config build (keys, types, the method's own validation) and the layout at
the recipe's world size (8 ranks for the paper recipes, 2 for the demo ones).

A phase whose method is not registered yet (ESFT and DenseMixer land in parallel branches) is
skipped with a reason naming the method, so the check turns on when the method arrives.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_ec.moe.methods import method_names
from megatron_ec.training.phase import validate_for_world
from megatron_ec.training.recipe import Recipe

RECIPES = Path(__file__).parents[1] / "examples" / "recipes"
FILES = sorted(RECIPES.glob("**/*.yaml"))
APP_C = (1e-5, 0.1, 0.1, 32, 1234, "bf16", 4096)
"""lr, min-lr ratio, warmup ratio, global batch, seed, precision, seq length (paper App. C)."""


def _phases():
    for path in FILES:
        for phase in Recipe.load(str(path)).phases:
            yield pytest.param(path, phase.name, id=f"{path.relative_to(RECIPES)}:{phase.name}")


def _world(path: Path) -> int:
    return 2 if path.stem == "demo" else 8


@pytest.mark.parametrize(("path", "phase"), list(_phases()))
def test_recipe_phase_passes_check(path, phase):
    recipe = Recipe.load(str(path))
    method = str((recipe.phase_data(phase).get("method") or {}).get("name", "sft"))
    if method not in method_names():
        pytest.skip(f"method {method!r} is not registered yet (registered: "
                    f"{', '.join(method_names())})")
    cfg = recipe.phase_config(phase)
    assert cfg.method.name == method
    # bf16 needs a GPU, which `--check` on this CPU would refuse: check the layout at fp32
    cpu = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    validate_for_world(cpu, _world(path))
    if path.stem != "demo":
        t = cfg.train
        assert (t.lr, t.min_lr_ratio, t.warmup_ratio, t.global_batch_size, t.seed, t.precision,
                cfg.data.seq_length) == APP_C


@pytest.mark.parametrize("path", sorted(RECIPES.glob("baselines/*.yaml")), ids=lambda p: p.name)
def test_baseline_recipes_start_from_the_family_import(path):
    """Each baseline phase starts from the family recipe's import (no chaining) with the paper's
    settings; ESFT with its defaults top_p 0.2 (token) / 0.1 (gate)."""
    recipe = Recipe.load(str(path))
    family = Recipe.load(str(RECIPES / path.name))
    start = family.phase_data(family.phases[0].name)["model"]["checkpoint"]
    phases = {p.name: recipe.phase_data(p.name) for p in recipe.phases}
    assert set(phases) == {"sft", "sft_aux", "esft_token", "esft_gate", "densemixer"}
    for name, data in phases.items():
        assert data["model"]["checkpoint"] == start, name
        assert data["data"] == family.phase_data(family.phases[0].name)["data"], name
        assert data["parallel"] == family.phase_data(family.phases[0].name)["parallel"], name
    assert phases["sft"]["method"] == {"name": "sft", "aux_loss": False}
    assert phases["sft_aux"]["method"] == {"name": "sft", "aux_loss": True}
    for name, score, top_p in (("esft_token", "token", 0.2), ("esft_gate", "gate", 0.1)):
        assert phases[name]["method"] == {"name": "esft", "score": score, "top_p": top_p,
                                          "train_shared_experts": False,
                                          "train_non_expert_modules": False}
    dirs = [data["output"]["dir"] for data in phases.values()]
    assert len(set(dirs)) == len(dirs)


def _write_recipe(tmp_path, phases, baselines):
    import yaml

    data = {"model": {"checkpoint": "runs/x/ckpt"}, "data": {"train": "d.jsonl"},
            "phases": phases, "pipeline": {"export_dir": "runs/x/hf", "baselines": baselines}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_demo_recipe_scores_an_sft_baseline_from_the_import():
    from megatron_ec.training.recipe import print_paths

    recipe = Recipe.load(str(RECIPES / "demo.yaml"))
    assert [p.name for p in recipe.main_phases()] == ["bias", "condenser"]
    assert recipe.phase_data("sft")["model"]["checkpoint"] == "runs/demo/ckpt"
    assert recipe.phase_data("condenser")["model"]["checkpoint"] == "runs/demo/phase1_bias"
    paths = dict(line.split("=", 1) for line in print_paths(recipe).splitlines())
    assert paths["FINAL_CKPT"] == "runs/demo/phase2_condenser"  # exported: the EC model
    assert paths["BASELINE_DIRS"] == "sft=runs/demo/baselines/sft"
    assert paths["MAIN_PHASE_DIRS"] == "'runs/demo/phase1_bias runs/demo/phase2_condenser'"


def test_a_main_phase_after_a_baseline_chains_from_the_main_phase_before_it(tmp_path):
    phases = [{"name": "bias", "output": {"dir": "p1"}},
              {"name": "sft", "model": {"checkpoint": "runs/x/ckpt"}, "output": {"dir": "b"}},
              {"name": "condenser", "method": {"name": "condenser"}, "output": {"dir": "p2"}}]
    recipe = Recipe.load(_write_recipe(tmp_path, phases, ["sft"]))
    assert recipe.phase_data("condenser")["model"]["checkpoint"] == "p1"


@pytest.mark.parametrize(("baselines", "message"), [
    (["nope"], "names 'nope', which is not a phase"),
    (["late"], "must set its own model.checkpoint"),
    (["early", "late"], "must set its own model.checkpoint"),
])
def test_bad_pipeline_baselines_are_one_line_errors(tmp_path, baselines, message):
    from megatron_ec.training.config_tree import ConfigError

    phases = [{"name": "early", "model": {"checkpoint": "c"}, "output": {"dir": "a"}},
              {"name": "late", "output": {"dir": "b"}}]
    with pytest.raises(ConfigError, match=message):
        Recipe.load(_write_recipe(tmp_path, phases, baselines))


def test_every_phase_a_baseline_is_refused(tmp_path):
    from megatron_ec.training.config_tree import ConfigError

    phases = [{"name": "only", "model": {"checkpoint": "c"}, "output": {"dir": "a"}}]
    with pytest.raises(ConfigError, match="at least one must be the main chain"):
        Recipe.load(_write_recipe(tmp_path, phases, ["only"]))
