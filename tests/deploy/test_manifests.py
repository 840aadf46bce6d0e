"""Kubernetes manifests and the compose file: render, validate against the Kubernetes
schemas shipped by ``kubernetes-validate`` (offline), and check how the pieces refer to
each other. KEDA's ScaledObject is a CRD without a shipped schema: checked by structure.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["cpu", "gpu"]
# Oldest version the manifests target (preStop `sleep` is on by default from 1.30) and
# the newest the package knows.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


def _load_renderer():
    spec = importlib.util.spec_from_file_location(
        "render_kustomize", DEPLOY / "render_kustomize.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_kustomize"] = module
    spec.loader.exec_module(module)
    return module


rk = _load_renderer()


def _rendered(overlay: str) -> dict[tuple[str, str], dict]:
    docs = rk.render(K8S / "overlays" / overlay)
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _all_manifest_files() -> list[Path]:
    return sorted(
        p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and not _is_json_patch(p)
    )


def _is_json_patch(path: Path) -> bool:
    return isinstance(yaml.safe_load(path.read_text()), list)


def _validate(doc: dict, version: str) -> None:
    kv.validate(doc, version, strict=True)


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", _all_manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates(path: Path, version: str):
    for doc in rk.load_yaml_documents(path):
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # no schema shipped; see test_scaled_object_structure
        _validate(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates(overlay: str, version: str):
    docs = rk.render(K8S / "overlays" / overlay)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        _validate(doc, version)


def test_strict_validation_catches_a_typo():
    deployment = _rendered("cpu")[("Deployment", "steerserve")]
    _container(deployment)["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kv.ValidationError):
        _validate(deployment, K8S_VERSIONS[-1])


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_full_set(overlay: str):
    kinds = sorted(kind for kind, _ in _rendered(overlay))
    assert kinds == sorted(
        [
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "ScaledObject",
        ]
    )


def test_every_manifest_is_used_or_an_example():
    referenced: set[Path] = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kfile.read_text())
        for entry in spec.get("resources", []):
            referenced.add((kfile.parent / entry).resolve())
        for patch in spec.get("patches", []):
            referenced.add((kfile.parent / patch["path"]).resolve())
    for path in K8S.rglob("*.yaml"):
        if path.name == "kustomization.yaml" or path.name.endswith(".example.yaml"):
            continue
        assert path.resolve() in referenced, f"{path} is not part of any kustomization"


def test_images_per_overlay():
    assert _container(_rendered("cpu")[("Deployment", "steerserve")])["image"] == "steerserve:cpu"
    assert _container(_rendered("gpu")[("Deployment", "steerserve")])["image"] == "steerserve:gpu"


def test_common_label_added_without_touching_selectors():
    docs = _rendered("cpu")
    for doc in docs.values():
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "steerserve"
    selector = docs[("Deployment", "steerserve")]["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/part-of" not in selector


def test_renderer_refuses_unknown_fields(tmp_path: Path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(rk.KustomizeError, match="namePrefix"):
        rk.render(tmp_path)


def test_renderer_main_prints_yaml(capsys):
    assert rk.main([str(K8S / "overlays" / "gpu")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {d["kind"] for d in docs} >= {"Deployment", "ScaledObject"}


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("steerserve", ("steerserve", None)),
        ("steerserve:cpu", ("steerserve", "cpu")),
        ("registry:5000/ml/steerserve:1.2", ("registry:5000/ml/steerserve", "1.2")),
        ("registry:5000/steerserve", ("registry:5000/steerserve", None)),
        ("steerserve@sha256:abc", ("steerserve", None)),
    ],
)
def test_split_image(image: str, expected: tuple):
    assert rk._split_image(image) == expected


def test_json_patch_ops():
    doc = {"a": {"b": [1, 2]}, "c": 1}
    rk.json_patch(doc, {"op": "add", "path": "/a/b/-", "value": 3})
    rk.json_patch(doc, {"op": "add", "path": "/a/b/0", "value": 0})
    rk.json_patch(doc, {"op": "replace", "path": "/c", "value": 2})
    rk.json_patch(doc, {"op": "remove", "path": "/a/b/1"})
    rk.json_patch(doc, {"op": "test", "path": "/c", "value": 2})
    assert doc == {"a": {"b": [0, 2, 3]}, "c": 2}
    with pytest.raises(rk.KustomizeError):
        rk.json_patch(doc, {"op": "replace", "path": "/missing", "value": 1})


# --------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports(overlay: str):
    docs = _rendered(overlay)
    deployment = docs[("Deployment", "steerserve")]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == "http", probe
    startup = container["startupProbe"]
    # Generous enough for a model load that includes a GGUF conversion.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # Shutdown: preStop delay + uvicorn's 10 s grace must fit in the termination grace.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 10 + 5
    service = docs[("Service", "steerserve")]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pods(overlay: str):
    docs = _rendered(overlay)
    deployment = docs[("Deployment", "steerserve")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        docs[("Service", "steerserve")]["spec"]["selector"],
        docs[("PodDisruptionBudget", "steerserve")]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_volumes(overlay: str):
    from server.settings import Settings

    docs = _rendered(overlay)
    config = docs[("ConfigMap", "steerserve-config")]["data"]
    for key, value in config.items():
        assert key.startswith("STEER_")
        field = key.removeprefix("STEER_").lower()
        assert field in Settings.model_fields, f"{key} is not a setting"
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings"
    assert config["STEER_HOST"] == "0.0.0.0"
    Settings(**{k.removeprefix("STEER_").lower(): v for k, v in config.items()})

    deployment = docs[("Deployment", "steerserve")]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert container["envFrom"] == [{"configMapRef": {"name": "steerserve-config"}}]
    (api_key,) = [e for e in container["env"] if e["name"] == "STEER_API_KEY"]
    ref = api_key["valueFrom"]["secretKeyRef"]
    secret = rk.load_yaml_documents(K8S / "secret.example.yaml")[0]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert not ref.get("optional", False), "the server must not start without its key"

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == config["STEER_DATA_DIR"] == "/data"
    volumes = {v["name"]: v for v in pod["volumes"]}
    pvc = docs[("PersistentVolumeClaim", "steerserve-data")]
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # Several replicas share priors and control vectors.
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # Read-only root: /tmp must be writable.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[next(n for n, p in mounts.items() if p == "/tmp")]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's numeric USER
    assert pod["enableServiceLinks"] is False


def test_gpu_overlay_requests_a_gpu():
    cpu = _container(_rendered("cpu")[("Deployment", "steerserve")])
    docs = _rendered("gpu")
    deployment = docs[("Deployment", "steerserve")]
    gpu = _container(deployment)
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    assert docs[("ConfigMap", "steerserve-config")]["data"]["STEER_DEVICE"] == "cuda"
    assert _rendered("cpu")[("ConfigMap", "steerserve-config")]["data"]["STEER_DEVICE"] == "cpu"


def test_pdb_leaves_room_for_drains():
    docs = _rendered("cpu")
    pdb = docs[("PodDisruptionBudget", "steerserve")]
    scaled = docs[("ScaledObject", "steerserve")]
    assert pdb["spec"]["minAvailable"] < scaled["spec"]["minReplicaCount"]
    hpa = rk.load_yaml_documents(K8S / "components" / "hpa-cpu" / "hpa.yaml")[0]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_object_structure(overlay: str):
    docs = _rendered(overlay)
    scaled = docs[("ScaledObject", "steerserve")]
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "initialCooldownPeriod",
        "fallback",
        "advanced",
        "triggers",
    }
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "steerserve",
    )
    assert ("Deployment", target["name"]) in docs
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for key in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[key], int) and spec[key] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] in {"AverageValue", "Value"}
    meta = trigger["metadata"]
    assert "steerserve_requests_waiting" in meta["query"]
    assert meta["serverAddress"].startswith("http")
    # KEDA wants trigger metadata as strings.
    assert all(isinstance(v, str) for v in meta.values())
    assert float(meta["threshold"]) > 0
    # The behavior block is the HPA's own type: validate it with the HPA schema.
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "probe"},
        "spec": {
            "scaleTargetRef": target,
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    _validate(hpa, K8S_VERSIONS[-1])


def test_hpa_alternative_targets_the_deployment():
    hpa = rk.load_yaml_documents(K8S / "components" / "hpa-cpu" / "hpa.yaml")[0]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "steerserve")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_deployment_has_resources():
    for overlay in OVERLAYS:
        resources = _container(_rendered(overlay)[("Deployment", "steerserve")])["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"]
        assert resources["limits"]["memory"]


# --------------------------------------------------------------------------- compose


def _compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_compose_server_service():
    compose = _compose()
    server = compose["services"]["steerserve"]
    assert server["build"]["context"] == ".."
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert "profiles" not in server
    for port in server["ports"]:
        assert port.startswith("127.0.0.1:"), "publish on loopback unless asked"
        assert port.endswith(":8000")
    volume, target = server["volumes"][0].split(":")
    assert target == "/data" and volume in compose["volumes"]
    assert server["stop_grace_period"] == "30s"
    assert "STEER_API_KEY" in server["environment"]


def test_compose_prometheus_is_profile_gated():
    compose = _compose()
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["metrics"]
    source, target, mode = prom["volumes"][0].split(":")
    assert (DEPLOY / source).is_file() and mode == "ro"
    config = yaml.safe_load((DEPLOY / source).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["steerserve:8000"]


def test_compose_gpu_override():
    gpu = _compose("compose.gpu.yaml")["services"]["steerserve"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "cu" in gpu["build"]["args"]["TORCH_VARIANT"]
