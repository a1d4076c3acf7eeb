"""DenseMixer, the specialisation losses and ESFT survive checkpoint, resume, export and HF restore.

Per method (one single-rank launch for all three):
  1. an uninterrupted run of STEPS steps with a checkpoint every RESUME_AT steps;
  2. a copy of it cut back to what a run killed after step RESUME_AT + 1 leaves (checkpoint
     RESUME_AT published, step RESUME_AT + 1 logged but not saved), resumed to the end;
  3. the resumed run's final checkpoint exported to HF, loaded by stock transformers with its
     routing restored, and its logits compared with the Megatron model's.

Resume is a rerun of the same arithmetic, so metrics (timings aside) and every saved tensor are
bitwise those of the uninterrupted run; ESFT resumes with its saved selection and never rescores.
The HF logits are other arithmetic: FP32_HF_PARITY.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron_ec.models import ckpt_dir
from megatron_ec.training.metrics import read_metrics
from tests.harness import run_on_ranks
from tests.test_finetune_support import demo_start  # noqa: F401 (a fixture)
from tests.test_method_plugin import _tensors
from tests.tolerance import FP32_HF_PARITY, assert_close_scaled

STEPS, RESUME_AT = 4, 2
METHODS = {
    "densemixer": {"name": "densemixer"},
    "spec_losses": {"name": "sft", "spec_losses": {"variance": 1.0e-2, "orthogonality": 1.0e-2}},
    "esft": {"name": "esft", "top_p": 0.3, "score_batches": 2},
}
NOT_COMPARED = ("tokens_per_s", "step_time")


def _config(path: Path, checkpoint, train, out: Path, method: dict) -> str:
    path.write_text(yaml.safe_dump({
        "model": {"checkpoint": str(checkpoint)},
        "data": {"train": str(train), "seq_length": 256, "cache_dir": str(path.parent / "cache")},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3,
                  "weight_decay": 0.1, "warmup_ratio": 0.25},
        "method": method,
        "output": {"dir": str(out), "tensorboard": False, "save_interval": RESUME_AT},
    }))
    return str(path)


def _cut_back(run: Path, copy: Path) -> None:
    """`copy` = what `run` looked like when killed right after logging step RESUME_AT + 1."""
    shutil.copytree(run, copy)
    for iteration in copy.glob("iter_*"):
        if int(iteration.name.split("_")[1]) > RESUME_AT:
            shutil.rmtree(iteration)
    (copy / ckpt_dir.LATEST).write_text(ckpt_dir.iteration_name(RESUME_AT))
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("".join(
        line + "\n" for line in lines if json.loads(line)["step"] <= RESUME_AT + 1))
    (copy / "esft_selection.json").unlink(missing_ok=True)  # a rescore would write it again


def _resume_and_export_worker(jobs: list[tuple[str, str, str, str, str]]):
    """Per job (name, config, uninterrupted out, resumed out, hf out): run, cut, resume, export;
    returns {name: (Megatron logits, HF logits, rescored, the resumed run's stderr)}."""
    import contextlib
    import io

    from checkpoint_convert.exporter import export_hf
    from checkpoint_convert.model import load_megatron
    from checkpoint_convert.verify import hf_logits, megatron_logits, random_tokens
    from megatron_ec import finetune
    from megatron_ec.parallel import ParallelConfig, init_parallel

    results = {}
    for name, config, out, resumed, hf_out in jobs:
        assert finetune.main(["--config", config]) == 0
        _cut_back(Path(out), Path(resumed))
        log = io.StringIO()
        with contextlib.redirect_stderr(log):
            assert finetune.main(["--config", config, f"output.dir={resumed}"]) == 0
        rescored = (Path(resumed) / "esft_selection.json").exists()
        export_hf(resumed, hf_out)
        init_parallel(ParallelConfig(), seed=0)
        model, _, cfg = load_megatron(resumed)
        tokens = random_tokens(cfg.vocab_size, 2, 32, seed=5)
        results[name] = (megatron_logits(model, tokens)[..., :cfg.vocab_size],
                         hf_logits(hf_out, tokens), rescored, log.getvalue())
    return results


@pytest.fixture(scope="module")
def runs(demo_start, tmp_path_factory):  # noqa: F811
    checkpoint, train = demo_start
    root = tmp_path_factory.mktemp("method_resume")
    jobs = [(name, _config(root / f"{name}.yaml", checkpoint, train, root / name, method),
             str(root / name), str(root / f"{name}_resumed"), str(root / f"{name}_hf"))
            for name, method in METHODS.items()]
    (results,) = run_on_ranks(_resume_and_export_worker, world_size=1, args=(jobs,), timeout=900)
    return root, results


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_continues_bitwise_like_the_uninterrupted_run(runs, name):
    root, results = runs
    assert f"at step {RESUME_AT}" in results[name][3], results[name][3][-2000:]
    reference = read_metrics(root / name / "metrics.jsonl")
    resumed = read_metrics(root / f"{name}_resumed" / "metrics.jsonl")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for ref, got in zip(reference, resumed):
        assert ref.keys() == got.keys()
        for key in sorted(set(ref) - set(NOT_COMPARED)):
            assert got[key] == ref[key], (name, ref["step"], key, ref[key], got[key])
    if name == "spec_losses":
        assert all(r["spec/variance"] < 0 < r["spec/orthogonality"] for r in reference)
    final = [ckpt_dir.latest_iteration(root / run) for run in (name, f"{name}_resumed")]
    assert final[0].name == final[1].name == ckpt_dir.iteration_name(STEPS)
    want, got = _tensors(final[0]), _tensors(final[1])
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{name}: {key} differs after the resume"
    start = _tensors(ckpt_dir.resolve(root / name / ckpt_dir.iteration_name(RESUME_AT)))
    assert any(not torch.equal(start[k], want[k]) for k in want), "steps 3-4 trained nothing"
    assert (json.loads((final[0] / "method_state.json").read_text())
            == json.loads((final[1] / "method_state.json").read_text()))
    assert not results[name][2], f"{name}: the resumed run scored again"


@pytest.mark.parametrize("name", list(METHODS))
def test_export_and_hf_restore_keep_the_megatron_logits(runs, name):
    from megatron_ec.eval.hf_routing import read_routing_file
    from megatron_ec.moe.methods.saved import load_method

    root, results = runs
    megatron, hf, _, _ = results[name]
    assert hf.shape == megatron.shape
    assert_close_scaled(hf, megatron, FP32_HF_PARITY, f"{name}: HF vs Megatron logits")
    exported, _ = read_routing_file(root / f"{name}_hf")
    trained = load_method(ckpt_dir.latest_iteration(root / f"{name}_resumed"))
    assert exported.name == trained.name == METHODS[name]["name"]
    assert exported.config.to_dict() == trained.config.to_dict()
