"""The model registry side of lineage: exported weights become a registered model version."""

from __future__ import annotations

import re

import fsspec
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dinoforge.lineage.store import DIGEST_TAG, upload

# MLflow's rules for alias names (its model registry docs): word characters and dashes, at most
# 255 of them; ``latest`` (any case) and ``v<digits>`` name versions, so they are reserved.
_ALIAS = re.compile(r"[\w\-]{1,255}")
_RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)


def check_alias(alias: str) -> None:
    """Raises ValueError for an alias MLflow would refuse."""
    if not _ALIAS.fullmatch(alias):
        raise ValueError(f"invalid model alias {alias!r}: 1 to 255 letters, digits, underscores or dashes")
    if _RESERVED_ALIAS.fullmatch(alias):
        raise ValueError(f"model alias {alias!r} is reserved by MLflow (latest, v<N>)")


def register(mlflow: MlflowClient, run_id: str, event: dict) -> None:
    """Logs the weights (and their JSON) under ``models/<name>`` of the run and registers
    that folder as a model version, unless this run already registered this digest."""
    from dinoforge.export import meta_uri  # imports torch: only model registration needs it

    name, weights, digest = event["name"], event["weights_uri"], event["digest"]
    folder = f"models/{name}"
    upload(mlflow, run_id, weights, folder)
    fs, path = fsspec.core.url_to_fs(meta_uri(weights))
    if fs.exists(path):
        upload(mlflow, run_id, meta_uri(weights), folder)
    try:
        mlflow.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        mlflow.create_registered_model(name)
    versions = mlflow.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = next((v for v in versions if v.tags.get(DIGEST_TAG) == digest), None)
    if version is None:
        source = f"{mlflow.get_run(run_id).info.artifact_uri}/{folder}"
        # No waiting for READY: open-source registries create versions READY at once.
        version = mlflow.create_model_version(
            name, source, run_id, await_creation_for=0, tags={DIGEST_TAG: digest, "dinoforge.weights_uri": weights}
        )
    if event["alias"]:
        mlflow.set_registered_model_alias(name, event["alias"], version.version)
