"""examples/finetune_condenser.sh as users run it: overrides of every recipe key, a failed step that
stops the chain with one line, and two nodes simulated on localhost against one node."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from megatron_ec.training.config_tree import ConfigError
from megatron_ec.training.metrics import read_metrics
from megatron_ec.training.recipe import Recipe, recipe_keys
from tests.harness import free_port
from tests.test_finetune_support import DEMO_RECIPE, PYTHON, REPO, cli_env, run_cli

LAUNCHER = REPO / "examples" / "finetune_condenser.sh"
PAPER_RECIPE = REPO / "examples" / "recipes" / "qwen3_30b_a3b.yaml"


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_every_recipe_key_is_overridable_and_listed():
    recipe = Recipe.load(str(DEMO_RECIPE), ["pipeline.demo_num_train=400",
                                            "pipeline.eval.heldout=", "phases.bias.train.lr=1e-4",
                                            "train.max_steps=3"])
    assert recipe.pipeline.demo_num_train == 400 and not recipe.pipeline.eval.heldout
    bias, condenser, sft = recipe.configs()
    assert bias.train.lr == 1e-4 and condenser.train.lr == 3e-3
    assert bias.train.max_steps == condenser.train.max_steps == sft.train.max_steps == 3
    cases = {
        "pipeline.demo_num_trian=1": "did you mean 'pipeline.demo_num_train'?",
        "pipeline.nope=1": "valid keys of pipeline: pipeline.hf_model, pipeline.export_dir, "
                           "pipeline.demo, pipeline.demo_num_train, pipeline.eval",
        "pipeline.eval.nope=1": "valid keys of pipeline.eval: pipeline.eval.heldout",
        "phases.bias.train.lrr=1": "did you mean 'phases.bias.train.lr'?",
        "phases.bias.nope.x=1": "valid keys of phases.bias: phases.bias.model, phases.bias.data",
        "phases.bias.pipeline.demo=true": "pipeline keys apply to the whole recipe",
        "nope.x=1": "valid sections: model, data, output, train, parallel, method, pipeline",
        "train.max_step=1": "did you mean 'train.max_steps'?",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            Recipe.load(str(DEMO_RECIPE), [override])
        assert expected in str(err.value), (override, str(err.value))
    listing = recipe_keys(["bias", "condenser"])
    for key in ("train.max_steps = None", "pipeline.demo_num_train = 2000",
                "pipeline.eval.heldout = None", "phases.<name>.<key>", "bias, condenser"):
        assert key in listing, key


def _launch(env: dict, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCHER), *overrides], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_a_failed_step_stops_the_launcher_with_one_line(tmp_path):
    # an unknown pipeline key: stops at the first step (was: "DEMO: unbound variable")
    result = _launch(cli_env(PYTHON=PYTHON), "pipeline.demo_num_trian=400")
    assert result.returncode == 2, result.stderr
    assert _error_lines(result.stderr) == ["megatron_ec.recipe: error: unknown config key "
                                           "'pipeline.demo_num_trian'; did you mean "
                                           "'pipeline.demo_num_train'?"], result.stderr
    assert "unbound" not in result.stderr
    # a paper recipe whose HF snapshot is missing: node 0's check, before any torchrun launch
    result = _launch(cli_env(PYTHON=PYTHON, RECIPE=str(PAPER_RECIPE), NPROC_PER_NODE="8"))
    assert result.returncode == 2, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("megatron_ec.recipe: error: models/Qwen3-30B-A3B: no such "
                               "directory; pass the HF model directory"), lines[0]
    assert "Traceback" not in result.stderr and "] import " not in result.stderr
    # a user error inside torchrun: the worker's line, exit 2, none of torchrun's report
    argv = ["-m", "megatron_ec.torchrun", "--standalone", "--nproc_per_node", "2",
            "-m", "megatron_ec.recipe", "--config", str(tmp_path / "none.yaml")]
    result = subprocess.run([PYTHON, *argv], cwd=REPO, env=cli_env(), text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert _error_lines(result.stderr) == [f"megatron_ec.recipe: error: {tmp_path / 'none.yaml'}:"
                                           " no such config file; fix the --config path"]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert "FAILED" not in result.stderr
    # node 1 alone (node 0 stopped at its check): one line after the rendezvous timeout, exit 3
    port = free_port()
    argv = ["-m", "megatron_ec.torchrun", "--nnodes", "2", "--node_rank", "1", "--master_addr",
            "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1",
            "--rdzv_conf", "timeout=3", "-m", "megatron_ec.recipe", "--config", "none.yaml"]
    result = subprocess.run([PYTHON, *argv], cwd=REPO, env=cli_env(MEGATRON_EC_RDZV_TIMEOUT="3"),
                            text=True, capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        "megatron_ec.torchrun (node 1): error: no rendezvous of 2 node(s) at 127.0.0.1:"
        f"{port} (timeout 3 s, DistNetworkError); another node stopped (node 0 prints why) "
        "or never started"], result.stderr


def _demo_overrides(root: Path, phase1: str = "phase1", phase2: str = "phase2") -> list[str]:
    """The demo recipe, tiny: 240 problems, 3 steps per EC phase (1 for the SFT baseline) at
    global batch 8, no evaluation or analysis."""
    return [f"model.checkpoint={root / 'ckpt'}", f"data.train={root / 'data' / 'train.jsonl'}",
            f"data.cache_dir={root / 'data_cache'}", f"phases.bias.output.dir={root / phase1}",
            f"phases.condenser.output.dir={root / phase2}", "output.tensorboard=false",
            "train.max_steps=3", "train.global_batch_size=8", "output.log_interval=1",
            f"pipeline.hf_model={root / 'hf_base'}", f"pipeline.export_dir={root / 'hf'}",
            "pipeline.demo_num_train=240", "pipeline.eval.heldout=", "pipeline.analysis_dir=",
            f"phases.sft.output.dir={root / (phase1 + '_sft')}", "phases.sft.train.max_steps=1"]


def _run_nodes(root: Path, overrides: list[str], fault: str | None = None,
               timeout: float = 600) -> list[tuple[int, str, float]]:
    """Both nodes' launchers side by side on a free port: [(exit status, stderr, exit time)];
    `fault` (MEGATRON_EC_FAULT) is set on node 1 only."""
    port = free_port()
    nodes, logs = [], []
    for rank in range(2):
        extra = {"MEGATRON_EC_FAULT": fault} if fault and rank == 1 else {}
        env = cli_env(PYTHON=PYTHON, NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RDZV_TIMEOUT="300",
                      COLLECTIVE_TIMEOUT="60", **extra)
        err = tempfile.TemporaryFile("w+")
        logs.append(err)
        nodes.append(subprocess.Popen(["bash", str(LAUNCHER), *overrides], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=err, text=True,
                                      start_new_session=True))
    ended = [None, None]
    deadline = time.monotonic() + timeout
    try:
        while None in ended and time.monotonic() < deadline:
            for rank, node in enumerate(nodes):
                if ended[rank] is None and node.poll() is not None:
                    ended[rank] = time.monotonic()
            time.sleep(0.5)
    finally:
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait()
    results = []
    for rank, (node, err) in enumerate(zip(nodes, logs)):
        err.seek(0)
        results.append((node.returncode if ended[rank] else None, err.read(), ended[rank]))
    return results


def test_two_nodes_on_localhost_match_one_node_and_survive_a_lost_node(tmp_path):
    """Two launcher processes (NNODES=2, one rank each) run the demo: node 1 is killed after
    phase 1's step 2 (before that step's save); node 0 then stops with torchrun's failure report
    within the collective timeout. Launched again, both resume from step 1's checkpoint and finish
    (both phases, export); the losses are bitwise those of one node with two ranks (the same
    world size, layout and rank order: the same arithmetic, only the processes' placement
    differs)."""
    overrides = _demo_overrides(tmp_path) + ["output.save_interval=1"]
    (code0, err0, end0), (code1, err1, end1) = _run_nodes(tmp_path, overrides,
                                                          fault="kill_after_step:2")
    assert code1 not in (0, None) and code0 not in (0, None), (code0, code1, err0[-3000:])
    assert end0 - end1 < 120, f"node 0 ended {end0 - end1:.0f} s after node 1"
    assert "[finetune_condenser] stopped: training failed" in err0, err0[-3000:]
    assert "megatron_ec.torchrun (node 0): a worker failed" in err0 and "resumes" in err0
    assert "Traceback" not in err0.split("megatron_ec.torchrun")[-1]
    assert len(read_metrics(tmp_path / "phase1" / "metrics.jsonl")) >= 1

    results = _run_nodes(tmp_path, overrides)
    for rank, (code, stderr, _) in enumerate(results):
        assert code == 0, f"node {rank}:\n{stderr[-3000:]}"
    assert "resuming" in results[0][1]
    assert (tmp_path / "hf" / "config.json").is_file()
    assert (tmp_path / "hf" / "megatron_ec_routing.json").is_file()
    assert "] export " in results[0][1] and "] export " not in results[1][1]

    # one node, two ranks, the same recipe from the same import
    one = run_cli("megatron_ec.recipe", ["--config", str(DEMO_RECIPE),
                                         *_demo_overrides(tmp_path, "one1", "one2"),
                                         "output.save_interval=1"], nproc=2, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    for two_nodes, one_node in (("phase1", "one1"), ("phase2", "one2")):
        multi = [r["loss"] for r in read_metrics(tmp_path / two_nodes / "metrics.jsonl")]
        single = [r["loss"] for r in read_metrics(tmp_path / one_node / "metrics.jsonl")]
        assert len(multi) == 3 and multi == single, (two_nodes, multi, single)
