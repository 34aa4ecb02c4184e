"""TorchX's ``local_docker`` scheduler, also for podman's Docker API.

podman (``podman system service``) answers docker-py with its own container states besides
Docker's: ``stopped`` for a container that has exited but is not yet cleaned up, ``stopping`` and
``configured``. TorchX 0.7.0 maps only Docker's states, so ``torchx run --wait`` or ``torchx
status`` fails with ``KeyError: 'stopped'`` when it polls at that moment. Installed, this is the
``local_docker`` scheduler (``[project.entry-points."torchx.schedulers"]`` in pyproject.toml).
"""

from typing import Any

from torchx.schedulers.docker_scheduler import DockerScheduler
from torchx.specs import AppState

# podman's states that Docker does not have, as the Docker state each stands for.
PODMAN_STATES = {"stopped": "exited", "stopping": "running", "configured": "created"}


class PodmanAwareDockerScheduler(DockerScheduler):
    def _get_app_state(self, container: Any) -> AppState:
        if container.status in PODMAN_STATES:  # docker-py reads .status from attrs["State"]
            state = container.attrs["State"]
            if isinstance(state, dict):
                state["Status"] = PODMAN_STATES[container.status]
            else:
                container.attrs["State"] = PODMAN_STATES[state]
        return super()._get_app_state(container)


def create_scheduler(session_name: str, **kwargs: Any) -> PodmanAwareDockerScheduler:
    """The ``torchx.schedulers`` entry point (TorchX calls it with the session name)."""
    return PodmanAwareDockerScheduler(session_name=session_name)
