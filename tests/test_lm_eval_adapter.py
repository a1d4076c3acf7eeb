"""The lm-evaluation-harness model `megatron_ec` on the local example tasks (examples/lm_eval_tasks).

A tiny Qwen2-MoE goes through the converter twice: imported and exported as is (SFT: plain
routing), and with condensers and learned-looking selection biases set (ExpertCondenser). The
harness's loglikelihoods with `megatron_ec` equal the stock `hf` model's where the routing is
plain, and a direct forward of the restored model where it is not (while stock `hf` differs);
`lm_eval --model megatron_ec` on the command line (the startup hook) gives the same numbers, and
its generations and GSM8K score equal `python -m megatron_ec.evaluate` on the same items.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lm_eval  # the `eval` extra; tools/install_env.sh installs it (requirements.txt)
import pytest
import torch

from megatron_ec import evaluate
from tests.tolerance import FP32_LAYOUT, assert_close_scaled, error_ratio


REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "examples" / "lm_eval_tasks"
MC, GSM8K = "megatron_ec_local_mc", "megatron_ec_local_gsm8k"
MAX_NEW_TOKENS = 8
CONDENSERS = {0: [3], 1: [5]}


def condenser_checkpoint(plain_ckpt: Path, dst: Path) -> Path:
    """A copy of an imported checkpoint with fixed condensers and non-trivial selection biases."""
    from megatron_ec.moe.methods import make_method
    from tests.test_convert_condenser import with_routing

    method = make_method("condenser", num_condensers=1, gamma=1e-3, condensers=CONDENSERS,
                         decisions={"condensers": CONDENSERS})
    return with_routing(plain_ckpt, dst, method, seed=0)


def randomized(hf_dir: str) -> str:
    """The model's weights redrawn at unit scale with decisive routers (HF's init leaves the
    routers near zero, where a routing change barely moves the loglikelihoods)."""
    from transformers import AutoModelForCausalLM

    from tools.make_tiny_hf import randomize

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    randomize(model, seed=3)
    model.save_pretrained(hf_dir)
    return hf_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{"plain": SFT export, "ec": ExpertCondenser export} of one tiny Qwen2-MoE."""
    from checkpoint_convert.exporter import export_hf
    from checkpoint_convert.importer import import_hf
    from megatron_ec.parallel import shutdown_parallel
    from tools.make_demo_data import write_demo_data
    from tools.make_tiny_model import make_tiny_qwen2_moe

    root = tmp_path_factory.mktemp("lm_eval")
    train, _ = write_demo_data(str(root / "demo"), num_train=100, num_heldout=1)
    hf_dir = randomized(make_tiny_qwen2_moe(str(root / "tiny"), [train], seed=3))
    try:
        import_hf(hf_dir, root / "plain_ckpt")
        dirs = {"plain": export_hf(root / "plain_ckpt", root / "plain"),
                "ec": export_hf(condenser_checkpoint(root / "plain_ckpt", root / "ec_ckpt"),
                                root / "ec")}
    finally:
        shutdown_parallel()
    return {name: str(path) for name, path in dirs.items()}


def harness_run(model, tasks, task_manager) -> dict:
    """simple_evaluate with the samples logged; returns {"results", "samples"}."""
    return lm_eval.simple_evaluate(model=model, tasks=tasks, log_samples=True,
                                   task_manager=task_manager, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0)


def loglikelihoods(samples: list[dict]) -> torch.Tensor:
    """[requests] float64: every choice's loglikelihood, document order (as the log writes it)."""
    return torch.tensor([float(resp[0][0]) for sample in sorted(samples, key=lambda s: s["doc_id"])
                         for resp in sample["resps"]], dtype=torch.float64)


def mc_requests(samples: list[dict]) -> list[tuple[str, str]]:
    """(context, continuation) of every choice, document order (in memory: a list of pairs;
    in the CLI's log: {"gen_args_N": {"arg_0", "arg_1"}})."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [(args["arg_0"], args["arg_1"]) if isinstance(args, dict) else tuple(args)
            for sample in ordered for args in (
                sample["arguments"].values() if isinstance(sample["arguments"], dict)
                else sample["arguments"])]


@torch.no_grad()
def direct_loglikelihoods(hf_dir: str, lm, requests, restore: bool) -> torch.Tensor:
    """One unpadded forward per request of a stock model (routing restored if asked), summing
    log-softmax over the continuation tokens the harness itself tokenised (`_encode_pair`)."""
    from transformers import AutoModelForCausalLM

    from megatron_ec.eval.hf_routing import restore_condenser_routing

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if restore:
        assert restore_condenser_routing(model, hf_dir) == 2
    values = []
    for context, continuation in requests:
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        ids = torch.tensor([context_ids + continuation_ids])
        logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), dim=-1)[0]
        positions = range(len(context_ids) - 1, ids.shape[1] - 1)
        values.append(sum(logprobs[p, t].item() for p, t in zip(positions, continuation_ids)))
    return torch.tensor(values, dtype=torch.float64)


@pytest.fixture(scope="module")
def mc_runs(exported):
    """The MC task through the Python API: {(model name, export): (lm, samples)}."""
    from lm_eval.models.huggingface import HFLM

    from megatron_ec.eval.lm_eval_adapter import MegatronECLM

    from lm_eval.tasks import TaskManager

    # Only the local tasks: indexing the harness's built-in ones costs 6 s of CPU per manager.
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    runs = {}
    for export in ("plain", "ec"):
        for name, make in (("megatron_ec", lambda d: MegatronECLM(pretrained=d, batch_size=2)),
                           ("hf", lambda d: HFLM(pretrained=d, device="cpu", dtype="float32",
                                                 batch_size=2))):
            lm = make(exported[export])
            runs[name, export] = lm, harness_run(lm, [MC], tasks)["samples"][MC]
    return runs


def test_plain_routing_scores_like_stock_hf(mc_runs):
    ours, stock = mc_runs["megatron_ec", "plain"], mc_runs["hf", "plain"]
    assert ours[0].restored_layers == 0  # SFT export: the family's routing
    assert torch.equal(loglikelihoods(ours[1]), loglikelihoods(stock[1]))  # same arithmetic


def test_condenser_routing_scores_like_the_restored_model(mc_runs, exported):
    lm, samples = mc_runs["megatron_ec", "ec"]
    assert lm.restored_layers == 2
    assert type(lm.model.model.layers[0].mlp.gate).__name__ == "RestoredGate"
    got, requests = loglikelihoods(samples), mc_requests(samples)
    want = direct_loglikelihoods(exported["ec"], lm, requests, restore=True)
    assert_close_scaled(got, want, FP32_LAYOUT, "harness vs direct restored loglikelihoods")
    stock = loglikelihoods(mc_runs["hf", "ec"][1])
    assert error_ratio(stock, want, FP32_LAYOUT) > 100, "the restored routing changed nothing"
    assert_close_scaled(stock, direct_loglikelihoods(exported["ec"], lm, requests, restore=False),
                        FP32_LAYOUT, "stock hf vs direct stock loglikelihoods")


def our_generations(hf_dir: str, questions: list[str]) -> list[str]:
    from megatron_ec.eval.generate import generate, load_exported, render_prompts

    loaded = load_exported(hf_dir, "cpu")
    return generate(loaded, render_prompts(loaded, questions), MAX_NEW_TOKENS, batch_size=1)


def write_gsm8k(task_dir: Path, hf_dir: str) -> None:
    """The bundled questions with golds that make the score non-trivial: the first question's
    gold is the answer the model gives (when it gives one), the others cannot match."""
    from megatron_ec.eval.tasks import TASKS

    path = task_dir / "gsm8k" / "test.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    outputs = our_generations(hf_dir, [record["question"] for record in records])
    first = TASKS["gsm8k"].parse(outputs[0])
    golds = [first if first is not None else "0", "-1", "-2"]
    path.write_text("".join(json.dumps({**record, "answer": f"#### {gold}"}) + "\n"
                            for record, gold in zip(records, golds)))


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_scores_equal_megatron_ec_evaluate(exported, mc_runs, tmp_path):
    task_dir = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR, task_dir)
    write_gsm8k(task_dir, exported["ec"])
    out = tmp_path / "ours.json"
    assert evaluate.main(["--hf", exported["ec"], "--tasks", "gsm8k", "--data-dir", str(task_dir),
                          "--out", str(out), "--batch-size", "1", "--max-new-tokens",
                          str(MAX_NEW_TOKENS), "--no-progress"]) == 0
    harness = run_cli([str(Path(sys.executable).with_name("lm_eval")), "--model", "megatron_ec",
                       "--model_args", f"pretrained={exported['ec']}", "--device", "cpu",
                       "--include_path", str(task_dir), "--tasks", f"{MC},{GSM8K}",
                       "--apply_chat_template", "--gen_kwargs", f"max_gen_toks={MAX_NEW_TOKENS}",
                       "--batch_size", "1", "--log_samples", "--output_path",
                       str(tmp_path / "harness")], tmp_path)
    assert harness.returncode == 0, harness.stderr[-3000:]
    assert "2 MoE layers with restored routing" in harness.stderr

    def logged(task):
        [path] = glob.glob(str(tmp_path / "harness" / "*" / f"samples_{task}_*.jsonl"))
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        return sorted(rows, key=lambda row: row["doc_id"])

    ours_samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text()
                    .splitlines()]
    gsm8k = logged(GSM8K)
    assert [row["arguments"]["gen_args_0"]["arg_0"] for row in gsm8k] == \
        [sample["prompt"] for sample in ours_samples]  # the training template, both sides
    assert [row["resps"][0][0] for row in gsm8k] == [sample["output"] for sample in ours_samples]
    report = json.loads(out.read_text())["tasks"]["gsm8k"]
    [results] = glob.glob(str(tmp_path / "harness" / "*" / "results_*.json"))
    harness_acc = json.loads(Path(results).read_text())["results"][GSM8K]["acc,none"]
    assert harness_acc == report["accuracy"] and report["correct"] >= (gsm8k[0]["acc"] > 0)
    # The MC task on the command line (chat-templated prompts): the restored model's numbers.
    mc, lm = logged(MC), mc_runs["megatron_ec", "ec"][0]
    want = direct_loglikelihoods(exported["ec"], lm, mc_requests(mc), restore=True)
    assert_close_scaled(loglikelihoods(mc), want, FP32_LAYOUT, "CLI vs direct loglikelihoods")


def test_startup_hook_is_installed_and_registers_lazily():
    """The interpreter running this test started with the hook (the CLI test runs it in a fresh
    one); it registered a placeholder naming the adapter, which the import made the class."""
    import site

    from lm_eval.api.registry import get_model

    from megatron_ec.eval import lm_eval_plugin

    installed = [Path(d, lm_eval_plugin.PTH_FILE.name) for d in site.getsitepackages()]
    assert any(p.is_file() and p.read_text() == lm_eval_plugin.PTH_FILE.read_text()
               for p in installed), ("the startup hook is missing or stale: tools/install_env.sh "
                                     "copies megatron_ec/eval/megatron_ec_lm_eval.pth into "
                                     "site-packages")
    lm_eval_plugin.install()  # idempotent once lm_eval.models is loaded
    assert get_model("megatron_ec").__module__ == lm_eval_plugin.ADAPTER.split(":")[0]


def test_bad_model_args_fail_with_one_line(tmp_path, exported):
    from megatron_ec.eval.lm_eval_adapter import MegatronECLM

    with pytest.raises(ValueError, match=r"pretrained=.*no config.json.*checkpoint_convert export"):
        MegatronECLM(pretrained=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="peft=adapter_dir: not supported.*drop it"):
        MegatronECLM(pretrained=exported["ec"], peft="adapter_dir")
