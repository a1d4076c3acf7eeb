"""Recipes: a fine-tuning config plus `phases:` and `pipeline:`, loaded and checked.

A recipe is a fine-tuning config (sections model, data, train, parallel, method, output) plus:

    phases:                        # run in order, in one torchrun launch
      - name: bias                 # a label (metrics use method.name as `phase`)
        method: {name: bias, gamma: 1.0e-3}
        output: {dir: runs/x/phase1_bias}
      - name: condenser            # starts from the previous phase's output.dir unless it sets
        method: {name: condenser, gamma: 5.0e-5}     # its own model.checkpoint
        output: {dir: runs/x/phase2_condenser}
    pipeline:                      # read by examples/finetune_condenser.sh only
      hf_model: path/to/hf         # imported into the first phase's model.checkpoint if missing
      export_dir: runs/x/hf        # the last phase is exported here

Each phase's config = the top-level sections, then the phase's own sections, then the command-line
overrides (`train.max_steps=10` applies to every phase; `phases.condenser.train.lr=1e-5` to one;
`pipeline.export_dir=runs/y/hf` to the pipeline section). Every key is validated, and
`python -m megatron_ec.recipe --list-keys` lists them all (`recipe_keys`).
A shared `model.checkpoint` (file or override) is where the FIRST phase starts; later phases start
from the previous phase's output.dir unless they set their own model.checkpoint. A plain config
(no `phases:`) is a recipe of one phase. `python -m megatron_ec.recipe` runs them all.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ec.training.config_tree import (
    ConfigError,
    apply_overrides,
    build,
    describe_keys,
    load_yaml,
    merge,
    unknown_key_message,
    valid_keys,
)

SECTIONS = ("model", "data", "train", "parallel", "method", "output")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation after export (recipe section `pipeline.eval`)."""

    heldout: str | None = None
    """JSONL with `instruction`/`input`/`answer` records (LLM-Adapters format); None (or empty,
    e.g. `pipeline.eval.heldout=` on the command line) = no eval."""
    max_samples: int = 200
    """Evaluate on the first this many records."""
    max_new_tokens: int = 48
    """Greedy decoding budget per answer."""


@dataclass(frozen=True)
class PipelineConfig:
    """Paths for `examples/finetune_condenser.sh` (recipe section `pipeline`)."""

    hf_model: str | None = None
    """HF model directory imported into the first phase's `model.checkpoint` when that has no
    checkpoint yet; None (or empty) = the checkpoint must exist."""
    export_dir: str | None = None
    """Where the last phase's checkpoint is exported as an HF directory; None (or empty) = no
    export."""
    demo: bool = False
    """Create the tiny demo model (`tools/make_tiny_model.py`) at `hf_model` and the demo data
    (`tools/make_demo_data.py`) next to `data.train` when they are missing."""
    demo_num_train: int = 2000
    """Training problems the demo data generator writes (`--num-train`)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: tuple[str, ...] = ()
    """Phases that are baselines, not steps of the main chain (e.g. `[sft]`): each must start from
    its own `model.checkpoint` (the import), is exported to `<its output.dir>/hf` and scored
    beside the main model. The main model is the last phase not listed here."""
    analysis_dir: str | None = None
    """Where `python -m megatron_ec.analyze` writes the comparison figures (activation/Gini of
    every scored model, router KL to the base, condenser vs routed gradient norms, the forcing
    ablation) after the evaluation; None (or empty) = no analysis."""


@dataclass(frozen=True)
class _PipelineSection:
    """The `pipeline` section seen from the top of a recipe (for dotted overrides and messages)."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


@dataclass(frozen=True)
class PhaseSpec:
    """One entry of `phases:`: a name and section overrides (validated when built)."""

    name: str
    sections: dict


class Recipe:
    """A loaded recipe file: shared sections, phases, pipeline, command-line overrides."""

    def __init__(self, path: str, data: dict, overrides: list[str]):
        self.path = path
        self.base = {k: v for k, v in data.items() if k in SECTIONS}
        unknown = [k for k in data if k not in SECTIONS + ("phases", "pipeline")]
        if unknown:
            allowed = list(SECTIONS) + ["phases", "pipeline"]
            raise ConfigError(unknown_key_message(unknown[0], allowed))
        self.phases = self._phases(data.get("phases"))
        self.global_overrides, self.phase_overrides, pipeline_overrides = \
            self._split_overrides(overrides)
        pipeline = apply_overrides({"pipeline": data.get("pipeline") or {}}, pipeline_overrides,
                                   _PipelineSection)["pipeline"]
        self.pipeline = build(PipelineConfig, pipeline, "pipeline.")
        self._check_baselines()

    def _check_baselines(self) -> None:
        names = [p.name for p in self.phases]
        for name in self.pipeline.baselines:
            if name not in names:
                raise ConfigError(f"{self.path}: pipeline.baselines names {name!r}, which is not "
                                  f"a phase; phases: {', '.join(names)}")
            spec = self.phases[names.index(name)]
            if "checkpoint" not in (spec.sections.get("model") or {}):
                raise ConfigError(f"{self.path}: baseline phase {name!r} must set its own "
                                  "model.checkpoint (the import it starts from), or it would "
                                  "train from the previous phase")
        if not [n for n in names if n not in self.pipeline.baselines]:
            raise ConfigError(f"{self.path}: every phase is in pipeline.baselines; at least one "
                              "must be the main chain")

    def main_phases(self) -> list[PhaseSpec]:
        """The phases of the main chain (not `pipeline.baselines`), in order."""
        return [p for p in self.phases if p.name not in self.pipeline.baselines]

    @classmethod
    def load(cls, path: str, overrides: list[str] | None = None) -> "Recipe":
        return cls(path, load_yaml(path), list(overrides or []))

    def _phases(self, raw) -> list[PhaseSpec]:
        if raw is None:
            name = str((self.base.get("method") or {}).get("name", "sft"))
            return [PhaseSpec(name, {})]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{self.path}: phases must be a non-empty list of mappings")
        phases = []
        for index, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ConfigError(f"{self.path}: phases[{index}] needs a name, e.g. "
                                  "{name: bias, method: {name: bias}}")
            sections = {k: v for k, v in item.items() if k != "name"}
            bad = [k for k in sections if k not in SECTIONS]
            if bad:
                allowed = [f"phases[{index}].{s}" for s in SECTIONS]
                raise ConfigError(unknown_key_message(f"phases[{index}].{bad[0]}", allowed))
            phases.append(PhaseSpec(item["name"], sections))
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.path}: phase names must be unique, got {names}")
        return phases

    def _split_overrides(self, overrides: list[str]):
        """(shared, {phase: its overrides}, pipeline overrides); every key checked here, so that an
        unknown one names the valid keys of its section (`pipeline.*`, `phases.<name>.*`)."""
        from megatron_ec.training.config import FinetuneConfig

        names = [p.name for p in self.phases]
        per_phase: dict[str, list[str]] = {n: [] for n in names}
        shared, pipeline = [], []
        section_keys = valid_keys(FinetuneConfig)
        for item in overrides:
            key, sep, _ = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. "
                                  "train.lr=1e-4")
            if key.startswith("phases."):
                _, name, rest = item.split(".", 2) if key.count(".") >= 2 else (None, "", "")
                if name not in per_phase:
                    raise ConfigError(f"override {item!r}: no phase named {name!r}; phases: "
                                      f"{', '.join(names)}")
                rest_key = rest.partition("=")[0].strip()
                if rest_key.split(".")[0] == "pipeline":
                    raise ConfigError(f"override {item!r}: pipeline keys apply to the whole "
                                      f"recipe, not to one phase; use {rest}")
                if rest_key not in section_keys:
                    allowed = [f"phases.{name}.{k}" for k in section_keys]
                    raise ConfigError(unknown_key_message(f"phases.{name}.{rest_key}", allowed))
                per_phase[name].append(rest)
            elif key == "pipeline" or key.startswith("pipeline."):
                pipeline.append(item)
            else:
                if key not in section_keys:
                    raise ConfigError(unknown_key_message(key, recipe_key_names(names)))
                shared.append(item)
        return shared, per_phase, pipeline

    def phase_data(self, name: str) -> dict:
        """The merged (unvalidated) sections of one phase, with chaining applied."""
        from megatron_ec.training.config import FinetuneConfig

        names = [p.name for p in self.phases]
        if name not in names:
            raise ConfigError(f"{self.path}: no phase named {name!r}; phases: "
                              f"{', '.join(p.name for p in self.phases)}")
        index = names.index(name)
        data = merge(self.base, self.phases[index].sections)
        data = apply_overrides(data, self.global_overrides, FinetuneConfig)
        data = apply_overrides(data, self.phase_overrides[name], FinetuneConfig)
        own_checkpoint = ("checkpoint" in (self.phases[index].sections.get("model") or {}) or
                          any(o.startswith("model.checkpoint=") for o in self.phase_overrides[name]))
        earlier = [p.name for p in self.phases[:index] if p.name not in self.pipeline.baselines]
        if earlier and not own_checkpoint:
            # chaining wins over a shared model.checkpoint: that one is where phase 1 starts;
            # a baseline phase is never a link of the chain
            previous = self.phase_data(earlier[-1])
            data = merge(data, {"model": {"checkpoint": _output_dir(previous)}})
        return data

    def phase_config(self, name: str):
        """The validated `FinetuneConfig` of one phase."""
        from megatron_ec.training.config import FinetuneConfig

        return build(FinetuneConfig, self.phase_data(name))

    def configs(self) -> list:
        return [self.phase_config(p.name) for p in self.phases]


def _output_dir(data: dict):
    output = data.get("output") or {}
    value = output.get("dir")
    if value is None:
        raise ConfigError("output.dir is required; set it in the config or as output.dir=...")
    return getattr(value, "text", value)


def print_paths(recipe: Recipe) -> str:
    """Shell assignments for the launcher."""
    configs = recipe.configs()
    by_name = dict(zip((p.name for p in recipe.phases), configs))
    first, last = configs[0], by_name[recipe.main_phases()[-1].name]
    train = first.data.train[0] if first.data.train else ""
    baselines = [f"{name}={by_name[name].output.dir}" for name in recipe.pipeline.baselines]
    values = {
        "HF_MODEL": recipe.pipeline.hf_model or "",
        "IMPORT_CKPT": first.model.checkpoint,
        "FINAL_CKPT": last.output.dir,
        "EXPORT_DIR": recipe.pipeline.export_dir or "",
        "DEMO": "1" if recipe.pipeline.demo else "",
        "DEMO_DATA_DIR": str(Path(train).parent) if recipe.pipeline.demo else "",
        "DEMO_NUM_TRAIN": str(recipe.pipeline.demo_num_train),
        "TRAIN_DATA": train,
        "EVAL_HELDOUT": recipe.pipeline.eval.heldout or "",
        "EVAL_MAX_SAMPLES": str(recipe.pipeline.eval.max_samples),
        "EVAL_MAX_NEW_TOKENS": str(recipe.pipeline.eval.max_new_tokens),
        "PHASE_DIRS": " ".join(c.output.dir for c in configs),
        "MAIN_PHASE_DIRS": " ".join(by_name[p.name].output.dir for p in recipe.main_phases()),
        "BASELINE_DIRS": " ".join(baselines),
        "ANALYSIS_DIR": recipe.pipeline.analysis_dir or "",
        "TP": str(first.parallel.tensor_model_parallel_size),
        "EP": str(first.parallel.expert_model_parallel_size),
        "ETP": str(first.parallel.expert_tensor_parallel_size),
    }
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def check_all(recipe: Recipe, num_ranks: int | None = None,
              hf_dir: str | None = None) -> list[str]:
    """`finetune --check` for every phase; a later phase whose start does not exist yet is checked
    against the first phase's start (same model and tokenizer).

    With `hf_dir`, a first phase whose checkpoint is not there yet is checked against the HF
    directory it will be imported from (`checkpoint_convert.importer.check_import` at the first
    phase's TP/EP, then the data with its tokenizer), so that every input is checked before the
    import runs."""
    from megatron_ec.models import ckpt_dir
    from megatron_ec.training.phase import check_phase

    def exists(source: Path) -> bool:
        return (source / ckpt_dir.LATEST).is_file() or (source / ckpt_dir.MODEL_META).is_file()

    lines = []
    configs = recipe.configs()
    hf_import = None
    first = Path(configs[0].model.checkpoint)
    if not exists(first):
        if hf_dir is None:
            raise ValueError(f"model.checkpoint={first}: no checkpoint there yet; import one "
                             "with python -m checkpoint_convert import")
        from checkpoint_convert.importer import check_import

        model_cfg = check_import(hf_dir, first, configs[0].parallel)
        hf_import = (hf_dir, model_cfg)
        lines.append(f"import {hf_dir} -> {first}: ok ({model_cfg.num_experts} experts, "
                     f"TP{configs[0].parallel.tensor_model_parallel_size}/"
                     f"EP{configs[0].parallel.expert_model_parallel_size})")
    for phase, cfg in zip(recipe.phases, configs):
        source = Path(cfg.model.checkpoint)
        note = ""
        if not exists(source) and cfg is not configs[0]:
            note = f" (checked against {configs[0].model.checkpoint}; trains from {source})"
            cfg = dataclasses.replace(cfg, model=configs[0].model)
        if hf_import is not None and Path(cfg.model.checkpoint) == first:
            result = check_phase(cfg, num_ranks, hf_import=hf_import)
            note += f" (data checked with the tokenizer of {hf_dir})"
        else:
            result = check_phase(cfg, num_ranks)
        lines.append(f"phase {phase.name}: {result}{note}")
    return lines


def recipe_key_names(phase_names: list[str] | None = None) -> list[str]:
    """Every dotted key an override may set: the phase sections, `pipeline.*`, and
    `phases.<name>.<section key>` for each phase (a placeholder `<name>` when none are given)."""
    from megatron_ec.training.config import FinetuneConfig

    section_keys = valid_keys(FinetuneConfig)
    keys = section_keys + valid_keys(_PipelineSection)
    for name in phase_names or ["<name>"]:
        keys += [f"phases.{name}.{k}" for k in section_keys]
    return keys


def recipe_keys(phase_names: list[str] | None = None) -> str:
    """`--list-keys` of a recipe: every key with its default and meaning, then `pipeline.*`, then
    how one phase's keys are set."""
    from megatron_ec.training.config import FinetuneConfig

    lines = []
    for key, default, doc in describe_keys(FinetuneConfig) + describe_keys(_PipelineSection):
        lines.append(f"{key} = {default}")
        if doc:
            lines.append(f"    {doc}")
    names = ", ".join(phase_names) if phase_names else "the names in the recipe's phases: list"
    lines.append("phases.<name>.<key> = (the shared value)")
    lines.append("    Any key above except pipeline.* for one phase only, e.g. "
                 "phases.condenser.method.gamma=1e-4 (<name>: " + names + "); applied after the "
                 "shared overrides. pipeline.* keys are shared by the whole recipe.")
    return "\n".join(lines)
