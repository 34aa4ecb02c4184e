"""Optional end-to-end lane on a real cluster (``KUBECONFIG``): applies the DinoPipeline CRD and a
DinoPipeline, then follows its status until it ends or ``--timeout`` passes.

    python -m dinoforge.operators.e2e_cluster --crd helm/dinoforge-operator/crds/dinopipelines.dinoforge.io.yaml \\
        --pipeline operators/examples/dinopipeline.yaml [--timeout 3600] [--delete]

The operator must be running (``helm install`` the chart, or ``dinoforge operator`` locally) and
Volcano installed: this exercises what the emulator tests cannot (scheduling, Volcano's job
controller, the garbage collector, admission and the API server's schema validation). Exit
status 0 when the pipeline Succeeded, 1 otherwise. Not run in CI: no cluster is reachable there.
"""

from __future__ import annotations

import argparse
import sys
import time

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "dinoforge.io", "v1alpha1", "dinopipelines"
ENDED = {"Succeeded", "Failed", "Invalid"}


def apply_crd(path: str) -> None:
    crd = yaml.safe_load(open(path))
    api = client.ApiextensionsV1Api()
    try:
        api.create_custom_resource_definition(crd)
        print(f"created CRD {crd['metadata']['name']}")
    except ApiException as error:
        if error.status != 409:
            raise
        current = api.read_custom_resource_definition(crd["metadata"]["name"])
        crd["metadata"]["resourceVersion"] = current.metadata.resource_version
        api.replace_custom_resource_definition(crd["metadata"]["name"], crd)
        print(f"replaced CRD {crd['metadata']['name']}")


def follow(namespace: str, name: str, timeout: float, interval: float = 10) -> dict:
    api = client.CustomObjectsApi()
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        line = (status.get("phase"), status.get("stage"), status.get("progress"), status.get("message"))
        if line != last:
            print("phase={} stage={} progress={} {}".format(*(value or "" for value in line)), flush=True)
            last = line
        if status.get("phase") in ENDED:
            return status
        time.sleep(interval)
    return {"phase": "Timeout"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crd", required=True, help="the CRD file (the chart's crds/)")
    parser.add_argument("--pipeline", required=True, help="a DinoPipeline manifest")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to follow the pipeline")
    parser.add_argument("--delete", action="store_true", help="delete the pipeline at the end (its jobs go with it)")
    args = parser.parse_args(argv)
    config.load_kube_config()
    apply_crd(args.crd)
    pipeline = yaml.safe_load(open(args.pipeline))
    namespace, name = pipeline["metadata"].get("namespace", "default"), pipeline["metadata"]["name"]
    time.sleep(2)  # the API server serves a new CRD's resource shortly after creating it
    client.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pipeline)
    status = follow(namespace, name, args.timeout)
    for stage, record in (status.get("stages") or {}).items():
        print(f"  {stage}: {record}")
    if args.delete:
        client.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return 0 if status.get("phase") == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
