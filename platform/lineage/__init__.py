"""MLflow lineage for every stage, written so that MLflow can never block or break training.

Each stage process records EVENTS (start, params, metrics, inputs, outputs, artifacts, a
registered model, end) into a JOURNAL first, then tries to SYNC them to MLflow:

- ``journal``: the events as JSON lines, one file per run, on any fsspec URI; content digests.
- ``record``: ``Lineage`` (one stage's run) and ``stage_lineage``/``pipeline_scope`` (which
  journal and parent run a stage records under).
- ``store``: which tracking store, a client for it, the fail-fast reachability check, tag names.
- ``sync``: journal -> MLflow, idempotent (``sync_journal``: ``dinoforge lineage sync DIR``).
- ``registry``: exported weights -> a registered model version with an alias.
- ``chain``: a pipeline's stage runs, inputs and outputs read back from MLflow.
"""

from dinoforge.lineage.chain import lineage_chain
from dinoforge.lineage.journal import digest_uri, read_journal
from dinoforge.lineage.record import Lineage, pipeline_scope, stage_lineage
from dinoforge.lineage.store import RUN_KEY_TAG, SYNCED_TAG, resolve_tracking_uri
from dinoforge.lineage.sync import sync_journal

__all__ = [
    "RUN_KEY_TAG",
    "SYNCED_TAG",
    "Lineage",
    "digest_uri",
    "lineage_chain",
    "pipeline_scope",
    "read_journal",
    "resolve_tracking_uri",
    "stage_lineage",
    "sync_journal",
]
