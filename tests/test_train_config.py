"""Config loading, recipes, schedule and progress: pure Python, no process groups."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import yaml

from megatron_ec.training.config import FinetuneConfig, TrainConfig
from megatron_ec.training.config_tree import ConfigError, apply_overrides, build
from megatron_ec.training.progress import Progress
from megatron_ec.training.recipe import Recipe
from megatron_ec.training.schedule import WarmupCosine

BASE = {"model": {"checkpoint": "ckpt"}, "data": {"train": "train.jsonl"},
        "output": {"dir": "out"}}


def _build(data=BASE, overrides=()):
    return build(FinetuneConfig, apply_overrides(data, list(overrides), FinetuneConfig))


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"'train.max_step'; did you mean 'train.max_steps'\?"):
        _build(overrides=["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'parallel.expert_model_parallel_size'"):
        _build({**BASE, "parallel": {"expert_parallel_size": 2}})
    with pytest.raises(ConfigError, match=r"did you mean 'data.seq_length'"):
        _build(overrides=["seq_length=3"])  # the right leaf at the wrong level


def test_overrides_are_type_checked():
    cfg = _build(overrides=["train.max_steps=7", "train.lr=1e-4", "output.dir=007",
                            "method.name=condenser", "method.num_condensers=[1, 0]",
                            "data.train=[a.jsonl, b.jsonl]"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-4
    assert cfg.output.dir == "007"  # str fields keep the text as typed
    assert cfg.method.num_condensers == [1, 0] and cfg.data.train == ("a.jsonl", "b.jsonl")
    for bad, message in [("train.lr=fast", "train.lr must be float"),
                         ("train.max_steps=2.5", "train.max_steps must be int"),
                         ("parallel.tensor_model_parallel_size=yes", "must be int"),
                         ("method.name=dense", "use one of sft, bias, condenser"),
                         ("train", "expected dotted.key=value")]:
        with pytest.raises(ConfigError, match=message):
            _build(overrides=[bad])


def test_yaml_exponent_without_dot_is_a_float():
    # PyYAML reads 1e-5 as a string; a float field accepts it.
    cfg = _build(yaml.safe_load("model: {checkpoint: c}\ndata: {train: t}\noutput: {dir: o}\n"
                                "train: {lr: 1e-5}\n"))
    assert cfg.train.lr == 1e-5


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="output is required|output.dir is required"):
        _build({k: v for k, v in BASE.items() if k != "output"})


def test_training_refuses_the_evaluation_only_force_condensers_switch():
    # force_condensers=false would silently train bias-only; it is the Sec. 6.3 eval ablation.
    with pytest.raises(ValueError, match="method.force_condensers=false is an evaluation switch"):
        _build(overrides=["method.name=condenser", "method.force_condensers=false"])
    assert _build(overrides=["method.name=condenser"]).method.force_condensers


def test_eval_interval_is_checked_and_listed():
    assert _build(overrides=["train.eval_interval=5"]).train.eval_interval == 5
    assert TrainConfig().eval_interval is None
    with pytest.raises(ValueError, match="train.eval_interval=-1"):
        TrainConfig(eval_interval=-1)
    from megatron_ec.training.launch import list_keys

    assert "train.eval_interval = None" in list_keys()


def test_global_batch_must_factor():
    train = TrainConfig(micro_batch_size=2, global_batch_size=12)
    assert train.accumulation_steps(dp_size=2) == 3
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size x data-parallel size"):
        train.accumulation_steps(dp_size=4)


def test_epochs_to_steps():
    assert TrainConfig(global_batch_size=32).total_steps(100) == 3
    assert TrainConfig(max_steps=5).total_steps(10) == 5
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainConfig(global_batch_size=32).total_steps(10)


def test_recipe_phases_chain_and_override(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        **BASE, "train": {"max_steps": 10},
        "phases": [
            {"name": "p1", "method": {"name": "bias", "gamma": 1e-3}, "output": {"dir": "o1"}},
            {"name": "p2", "method": {"name": "condenser", "gamma": 5e-5},
             "output": {"dir": "o2"}},
        ],
        "pipeline": {"hf_model": "hf", "export_dir": "exported"},
    }))
    recipe = Recipe.load(str(path), ["train.max_steps=3", "phases.p2.train.lr=2e-5",
                                     "model.checkpoint=imported", "phases.p1.output.dir=x1"])
    first, second = recipe.configs()
    assert first.model.checkpoint == "imported" and second.model.checkpoint == "x1"
    assert first.method.gamma == 1e-3 and second.method.name == "condenser"
    assert first.train.max_steps == second.train.max_steps == 3
    assert first.train.lr == 1e-5 and second.train.lr == 2e-5
    with pytest.raises(ConfigError, match="no phase named 'p3'"):
        Recipe.load(str(path), ["phases.p3.train.lr=1"])
    with pytest.raises(ConfigError, match="did you mean 'pipeline.export_dir'"):
        Recipe.load(str(path), []).__class__(str(path), {**BASE, "pipeline": {"export": "x"}}, [])


def test_schedule_warmup_then_cosine_to_floor():
    schedule = WarmupCosine.from_ratio(1e-5, total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert schedule.warmup_steps == 10
    assert math.isclose(schedule(0), 1e-6) and math.isclose(schedule(9), 1e-5)
    assert math.isclose(schedule(10), 1e-5)
    assert math.isclose(schedule(55), 1e-6 + 0.5 * 9e-6)  # half way down the cosine
    lrs = [schedule(i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 1e-6
    assert math.isclose(schedule(100), 1e-6)


def test_progress_plain_lines_when_not_a_tty():
    stream = io.StringIO()
    progress = Progress("bias", total=4, every=2, stream=stream)
    for step in range(1, 5):
        progress.update(step, loss=1.0 / step)
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "4/4"]
    assert "ETA" in lines[0] and "\r" not in stream.getvalue()


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parents[1].glob("examples/recipes/*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    loaded = Recipe.load(str(recipe))
    main = [loaded.phase_config(p.name) for p in loaded.main_phases()]
    baselines = [loaded.phase_config(name) for name in loaded.pipeline.baselines]
    assert [c.method.name for c in main] == ["bias", "condenser"]
    for baseline in baselines:  # the demo's SFT: from the import, not from phase 2
        assert baseline.model.checkpoint == main[0].model.checkpoint
    configs = main + baselines
    assert configs[1].model.checkpoint == configs[0].output.dir
    if recipe.name != "demo.yaml":  # the paper's App. C settings
        for cfg in configs:
            t = cfg.train
            assert (t.lr, t.min_lr_ratio, t.warmup_ratio, t.global_batch_size, t.seed,
                    t.precision, cfg.data.seq_length) == (1e-5, 0.1, 0.1, 32, 1234, "bf16", 4096)
            assert t.accumulation_steps(8 // cfg.parallel.tensor_model_parallel_size) >= 1
