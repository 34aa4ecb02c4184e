"""Reads a pipeline's lineage back from MLflow: its stage runs with their inputs and outputs."""

from __future__ import annotations

import json

from dinoforge.lineage.store import DIGEST_TAG, STAGE_TAG, client
from mlflow.entities import DatasetInput
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID


def _dataset_entry(dataset_input: DatasetInput) -> tuple[str, dict]:
    tags = {tag.key: tag.value for tag in dataset_input.tags}
    dataset = dataset_input.dataset
    source = json.loads(dataset.source)
    entry = {"name": dataset.name, "uri": source.get("uri"), "digest": tags.get(DIGEST_TAG, dataset.digest)}
    return tags.get(MLFLOW_DATASET_CONTEXT, ""), entry


def lineage_chain(tracking_uri: str, experiment: str, pipeline_run_id: str) -> list[dict]:
    """The child runs of a pipeline run in start order, each ``{"run_id", "name", "stage",
    "status", "inputs", "outputs"}`` with inputs/outputs as ``{"name", "uri", "digest", "kind"}``.
    MLflow errors propagate (this is a reporting helper, not part of training)."""
    mlflow = client(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = mlflow.search_runs(
        [found.experiment_id],
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{pipeline_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    chain = []
    for run in runs:
        entry = {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "stage": run.data.tags.get(STAGE_TAG),
            "status": run.info.status,
            "inputs": [],
            "outputs": [],
        }
        for dataset_input in mlflow.get_run(run.info.run_id).inputs.dataset_inputs:
            context, item = _dataset_entry(dataset_input)
            is_output = context.startswith("output:")
            item["kind"] = context.removeprefix("output:")
            entry["outputs" if is_output else "inputs"].append(item)
        chain.append(entry)
    return chain
