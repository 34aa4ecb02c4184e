"""The operator confined to namespaces (the chart's ``operator.watchNamespaces``): run with kopf's
``--namespace`` against a fresh emulator, it drives a pipeline in its namespace and leaves one in
another namespace untouched, and every call it makes is granted by the namespaced Role the chart
renders for it. (Its own module: tests/test_operator.py keeps an all-namespaces operator running
for its whole module, and two kopf operators should not share one process.)"""

import time

from test_helm_operator import render
from test_operator import (GROUP, JOBS, PLURAL, VERSION, emulated_api_server, finish, get, pipeline, rules_of,
                           running_operator, stage_job)


def test_an_operator_watching_one_namespace_leaves_the_others_alone(tmp_path):
    with emulated_api_server() as emulator, running_operator(emulator, tmp_path, ["--namespace=ml"]) as api:
        api.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, pipeline("mine", str(tmp_path / "mine")))
        theirs = pipeline("theirs", str(tmp_path / "theirs"))
        theirs["metadata"]["namespace"] = "other"
        api.create_namespaced_custom_object(GROUP, VERSION, "other", PLURAL, theirs)
        finish(api, stage_job(api, "mine", "curate"), "Completed")
        stage_job(api, "mine", "pretrain")  # the next stage started: the pipeline is being driven
        time.sleep(1.0)  # five of the operator's timer intervals
        untouched = api.get_namespaced_custom_object(GROUP, VERSION, "other", PLURAL, "theirs")
        assert "status" not in untouched and not untouched["metadata"].get("finalizers")
        assert api.list_namespaced_custom_object(*JOBS[:2], "other", JOBS[2])["items"] == []
        assert get(api, "mine")["status"]["stage"] == "pretrain"
        called = set(emulator["api"].calls)

    docs = render(None, "operator.watchNamespaces={ml}")
    (role,) = [doc for doc in docs if doc["kind"] == "Role"]
    (binding,) = [doc for doc in docs if doc["kind"] == "RoleBinding"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ml"
    assert not [doc for doc in docs if doc["kind"].startswith("Cluster")]
    assert called <= rules_of(role), called - rules_of(role)
    # The same rules as the ClusterRole, which tests/test_operator.py matches call for call.
    (cluster_role,) = [doc for doc in render() if doc["kind"] == "ClusterRole"]
    assert rules_of(role) == rules_of(cluster_role)
