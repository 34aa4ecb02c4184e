"""Reads a pipeline's lineage back from MLflow: its stage runs with their inputs and outputs."""

from __future__ import annotations

import json

from dinoforge.lineage.store import DIGEST_TAG, STAGE_TAG, client, parse_output_tag
from mlflow.entities import DatasetInput
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID


def _dataset_entry(dataset_input: DatasetInput) -> dict:
    tags = {tag.key: tag.value for tag in dataset_input.tags}
    dataset = dataset_input.dataset
    return {
        "name": dataset.name,
        "uri": json.loads(dataset.source).get("uri"),
        "digest": tags.get(DIGEST_TAG, dataset.digest),
        "kind": tags.get(MLFLOW_DATASET_CONTEXT, ""),
    }


def lineage_chain(tracking_uri: str, experiment: str, pipeline_run_id: str) -> list[dict]:
    """The child runs of a pipeline run in start order, each ``{"run_id", "name", "stage",
    "status", "inputs", "outputs"}`` with inputs (dataset inputs) and outputs (output tags) as
    ``{"name", "uri", "digest", "kind"}``, plus ``"models"``: the ids of the run's logged models.
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
    for found_run in runs:
        run = mlflow.get_run(found_run.info.run_id)  # with its inputs and outputs
        outputs = [item for key, value in sorted(run.data.tags.items()) if (item := parse_output_tag(key, value))]
        chain.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "stage": run.data.tags.get(STAGE_TAG),
                "status": run.info.status,
                "inputs": [_dataset_entry(dataset_input) for dataset_input in run.inputs.dataset_inputs],
                "outputs": outputs,
                "models": [output.model_id for output in (run.outputs.model_outputs if run.outputs else [])],
            }
        )
    return chain
