"""A DinoPipeline's stages: which run, what each reads and writes (by URI under ``spec.output``),
and each stage's Volcano Job, built by dry-running the stage's TorchX component on our
kubernetes scheduler: the same body ``torchx run -s kubernetes jobs/<stage>.py:<stage>`` submits.

Chaining (every URI is fixed by ``spec.output`` alone, so the whole plan, and every job's
command line, is known and checked before the first job starts):

- curate  -> ``<output>/curate``; its curated sample ``<output>/curate/curated.parquet`` is the
  training data (``data.dataset=manifest:...``) of every training stage;
- pretrain -> ``<output>/pretrain`` (run directory);
- highRes -> ``<output>/highres``, ``train.init_from=<output>/pretrain``;
- distill -> ``<output>/distill``, teacher: the previous training stage's run directory;
- evaluate: first exports the last training run to ``<output>/evaluate/backbone.pth``
  (``dinoforge export``), then ``dinoforge evaluate suite`` on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

STAGES = ("curate", "pretrain", "highres", "distill", "evaluate")
# stage -> (its key under spec, the TorchX component that runs it)
SPEC_KEYS = {"curate": "curate", "pretrain": "pretrain", "highres": "highRes", "distill": "distill",
             "evaluate": "evaluate"}
COMPONENTS = {"curate": "dinoforge.curate.curate", "pretrain": "dinoforge.pretrain.pretrain",
              "highres": "dinoforge.pretrain.pretrain", "distill": "dinoforge.distill.distill",
              "evaluate": "dinoforge.evaluate.evaluate"}
# spec resources key -> (component argument, smallest value)
RESOURCES = {"nnodes": ("nnodes", 1), "nprocPerNode": ("nproc_per_node", 1), "gpusPerNode": ("gpus_per_node", 0),
             "cpu": ("cpu", 1), "memoryMB": ("memMB", 1)}
DEFAULT_RETRIES = 2
DEFAULT_QUEUE = "default"


class InvalidSpec(ValueError):
    """A DinoPipeline the operator refuses; ``field`` is the offending spec path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])


@dataclass(frozen=True)
class Stage:
    name: str
    component: str
    args: list[str]  # the component's arguments, as `torchx run` takes them after the component
    output: str  # what the next stage reads
    retries: int
    overrides: list[str] = field(default_factory=list)  # after `--`


def _resources(spec: Mapping[str, Any], stage_spec: Mapping[str, Any], where: str) -> list[str]:
    merged = {**(spec.get("resources") or {}), **(stage_spec.get("resources") or {})}
    args = []
    for key, value in merged.items():
        if key not in RESOURCES:
            raise InvalidSpec(f"{where}.resources.{key}", "unknown resource")
        argument, smallest = RESOURCES[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
            source = where if key in (stage_spec.get("resources") or {}) else "spec"
            raise InvalidSpec(f"{source}.resources.{key}", f"must be an integer >= {smallest}, got {value!r}")
        args += [f"--{argument}", str(value)]
    return args


def _retries(spec: Mapping[str, Any], stage_spec: Mapping[str, Any], where: str) -> int:
    for source, value in ((where, stage_spec.get("retries")), ("spec", spec.get("retries"))):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidSpec(f"{source}.retries", f"must be an integer >= 0, got {value!r}")
            return value
    return DEFAULT_RETRIES


def _required_uri(spec: Mapping[str, Any], key: str, where: str = "spec") -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidSpec(f"{where}.{key}", "required: a non-empty URI")
    return value


def _check_config(preset: Any, overrides: list[str], where: str, student: list[str]) -> None:
    """Loads the preset with the overrides, as the stage will: a bad name or override fails now."""
    from dinoforge.config import load_config

    if not isinstance(preset, str) or not preset:
        raise InvalidSpec(f"{where}.preset", "required: a dinoforge preset name")
    attempts = [(f"{where}.preset", []), (f"{where}.overrides", overrides), (f"{where}.student", overrides + student)]
    for path, attempt in attempts[:1] + [(path, more) for path, more in attempts[1:] if more]:
        try:
            load_config(preset, attempt)
        except Exception as error:  # load_config raises several kinds; the message is what counts
            raise InvalidSpec(path, f"{type(error).__name__}: {error}") from None


def _launch(spec: Mapping[str, Any], stage_spec: Mapping[str, Any], where: str, job_name: str,
            lineage_parent: str) -> list[str]:
    args = ["--name", job_name, *_resources(spec, stage_spec, where)]
    # The pipeline's image, else the operator's own (its chart sets DINOFORGE_IMAGE), else the release.
    if image := spec.get("image") or os.environ.get("DINOFORGE_IMAGE"):
        args += ["--image", image]
    mlflow = spec.get("mlflow") or {}
    if mlflow.get("trackingUri"):
        args += ["--mlflow_tracking_uri", mlflow["trackingUri"]]
    if mlflow.get("experiment"):
        args += ["--mlflow_experiment", mlflow["experiment"]]
    if lineage_parent:
        args += ["--lineage_parent", lineage_parent]
    # One journal for the whole pipeline, as `dinoforge pipeline` does (platform/pipeline.py).
    return args + ["--env", f"DINOFORGE_LINEAGE_DIR={join(spec['output'], 'lineage')}"]


def plan(spec: Mapping[str, Any], pipeline: str, lineage_parent: str = "") -> list[Stage]:
    """The stages of ``spec`` in order; raises InvalidSpec naming the first offending field."""
    out = _required_uri(spec, "output")
    pool = _required_uri(spec, "pool")
    for key in ("curate", "pretrain"):
        if not isinstance(spec.get(key), Mapping):
            raise InvalidSpec(f"spec.{key}", "required")
    stages: list[Stage] = []

    def launch(stage: str) -> tuple[Mapping[str, Any], list[str], int]:
        where = f"spec.{SPEC_KEYS[stage]}"
        stage_spec = spec.get(SPEC_KEYS[stage]) or {}
        return stage_spec, _launch(spec, stage_spec, where, f"{pipeline}-{stage}", lineage_parent), \
            _retries(spec, stage_spec, where)

    cur, args, retries = launch("curate")
    weights = _required_uri(cur, "weights", "spec.curate")
    n = cur.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidSpec("spec.curate.n", f"must be an integer >= 1, got {n!r}")
    args += ["--manifest", pool, "--weights", weights, "--out", join(out, "curate"), "--n", str(n)]
    if spec.get("evalManifest"):
        args += ["--eval_manifest", spec["evalManifest"]]
    if cur.get("dedupMethod"):
        args += ["--dedup_method", cur["dedupMethod"]]
    curated = join(out, "curate", "curated.parquet")
    stages.append(Stage("curate", COMPONENTS["curate"], args, curated, retries,
                        ["--seeds", spec["seeds"]] if spec.get("seeds") else []))

    dataset = f"data.dataset=manifest:{curated}"
    previous_run = ""
    for stage in ("pretrain", "highres", "distill"):
        if stage != "pretrain" and not spec.get(SPEC_KEYS[stage]):
            continue
        train, args, retries = launch(stage)
        where = f"spec.{SPEC_KEYS[stage]}"
        overrides = list(train.get("overrides") or [])
        student = [f"model.arch={train['student']}"] if train.get("student") else []
        _check_config(train.get("preset"), overrides, where, student)
        run = join(out, stage)
        args += ["--output", run, "--preset", train["preset"]]
        if train.get("maxSteps"):
            args += ["--max_steps", str(train["maxSteps"])]
        # Ours last: later overrides win, so the chained URIs are the ones used.
        chained = [dataset]
        if stage == "highres":
            chained.append(f"train.init_from={previous_run}")
        if stage == "distill":
            args += ["--teacher", previous_run]
        stages.append(Stage(stage, COMPONENTS[stage], args, run, retries, [*overrides, *student, *chained]))
        previous_run = run

    ev, args, retries = launch("evaluate")
    weights_out = join(out, "evaluate", "backbone.pth")
    args += ["--weights", weights_out, "--export_from", previous_run, "--protocols", ev.get("protocols") or "knn"]
    stages.append(Stage("evaluate", COMPONENTS["evaluate"], args, weights_out, retries))
    return stages


def component_args(stage: Stage, attempt: int) -> list[str]:
    """The arguments of ``torchx run ... <component>`` for this attempt (the attempt is in the
    job's name, so each re-created job has its own)."""
    args = list(stage.args)
    args[args.index("--name") + 1] += f"-{attempt}"
    return args + (["--", *stage.overrides] if stage.overrides else [])


def scheduler_cfg(spec: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"namespace": namespace, "queue": spec.get("queue") or DEFAULT_QUEUE}
    for key, option in (("priorityClass", "priority_class"), ("serviceAccount", "service_account"),
                        ("objectStoreSecret", "object_store_secret")):
        if spec.get(key):
            cfg[option] = spec[key]
    return cfg


def job_body(stage: Stage, attempt: int, spec: Mapping[str, Any], namespace: str) -> dict:
    """The Volcano Job ``torchx run -s kubernetes -cfg ... <component> <args>`` would submit."""
    from kubernetes.client import ApiClient
    from torchx.runner import get_runner

    try:
        info = get_runner().dryrun_component(stage.component, component_args(stage, attempt), "kubernetes",
                                             cfg=scheduler_cfg(spec, namespace), workspace=None)
    except (ValueError, TypeError, SystemExit) as error:
        raise InvalidSpec(f"spec.{SPEC_KEYS[stage.name]}", f"{type(error).__name__}: {error}") from None
    return ApiClient().sanitize_for_serialization(info.request.resource)
