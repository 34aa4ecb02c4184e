"""The model registry side of lineage: exported weights become an MLflow Model (pyfunc, see
``pyfunc``) logged as the run's model output (MLflow 3 logged model) and a registered version."""

from __future__ import annotations

import os
import re
import tempfile

from dinoforge.lineage.store import DIGEST_TAG, local_copy
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# MLflow's rules for alias names (its model registry docs): word characters and dashes, at most
# 255 of them; ``latest`` (any case) and ``v<digits>`` name versions, so they are reserved.
_ALIAS = re.compile(r"[\w\-]{1,255}")
_RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)
WEIGHTS_TAG = "dinoforge.weights_uri"
MODEL_TYPE = "dinoforge-backbone"


def check_alias(alias: str) -> None:
    """Raises ValueError for an alias MLflow would refuse."""
    if not _ALIAS.fullmatch(alias):
        raise ValueError(f"invalid model alias {alias!r}: 1 to 255 letters, digits, underscores or dashes")
    if _RESERVED_ALIAS.fullmatch(alias):
        raise ValueError(f"model alias {alias!r} is reserved by MLflow (latest, v<N>)")


def _logged_model(mlflow: MlflowClient, run_id: str, event: dict) -> LoggedModel:
    """The id of the run's logged model for these weights (by digest), created and filled with
    the pyfunc model if missing or left unfinished by a crash; it is the run's model output."""
    from dinoforge.export import meta_uri  # imports torch: only model registration needs it
    from dinoforge.lineage import pyfunc
    from mlflow.models import Model

    run = mlflow.get_run(run_id)
    found = [
        m
        for m in mlflow.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
        if m.tags.get(DIGEST_TAG) == event["digest"]
    ]
    model = (
        found[0]
        if found
        else mlflow.create_logged_model(
            run.info.experiment_id,
            name=event["name"],
            source_run_id=run_id,
            model_type=MODEL_TYPE,
            tags={DIGEST_TAG: event["digest"], WEIGHTS_TAG: event["weights_uri"]},
        )
    )
    if model.status != LoggedModelStatus.READY:
        with (
            local_copy(event["weights_uri"]) as weights,
            local_copy(meta_uri(event["weights_uri"])) as meta,
            tempfile.TemporaryDirectory() as tmp,
        ):
            path = os.path.join(tmp, "model")
            pyfunc.save(
                weights,
                meta,
                path,
                Model(
                    artifact_path=model.artifact_location,
                    run_id=run_id,
                    model_id=model.model_id,
                    model_uuid=model.model_id,
                ),
            )
            mlflow.log_model_artifacts(model.model_id, path)
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    outputs = run.outputs.model_outputs if run.outputs else []
    if model.model_id not in [output.model_id for output in outputs]:
        mlflow.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model


def register(mlflow: MlflowClient, run_id: str, event: dict) -> None:
    """Logs the weights as the run's MLflow Model and registers it as a version of the registered
    model ``event["name"]`` (``alias`` then points at it), unless this run already registered
    this digest."""
    name, digest = event["name"], event["digest"]
    model = _logged_model(mlflow, run_id, event)
    try:
        mlflow.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        mlflow.create_registered_model(name)
    versions = mlflow.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = next((v for v in versions if v.tags.get(DIGEST_TAG) == digest), None)
    if version is None:
        # No waiting for READY: open-source registries create versions READY at once.
        version = mlflow.create_model_version(
            name,
            # The model's own location, not models:/<id>: a local registry resolves that through the
            # global tracking URI (MLflow 3.17), which lineage leaves alone.
            model.artifact_location,
            run_id,
            await_creation_for=0,
            model_id=model.model_id,
            tags={DIGEST_TAG: digest, WEIGHTS_TAG: event["weights_uri"]},
        )
    if event["alias"]:
        mlflow.set_registered_model_alias(name, event["alias"], version.version)
