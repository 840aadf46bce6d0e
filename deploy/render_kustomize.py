"""Render the kustomizations under deploy/k8s without kubectl (a small, strict subset).

    python deploy/render_kustomize.py deploy/k8s/overlays/cpu > steerserve-cpu.yaml

It implements exactly the kustomize features these manifests use, with kustomize's
semantics, and refuses any other field so it can never silently disagree with
``kubectl kustomize``:

* ``resources`` (files and directories holding a kustomization), ``components``
  (``kind: Component``), in order;
* ``labels`` with ``pairs`` and ``includeSelectors: false`` (metadata labels only, plus
  pod-template labels with ``includeTemplates: true``);
* ``namespace``;
* ``images`` (``name`` → ``newName`` / ``newTag`` / ``digest`` on containers and
  initContainers of pod templates);
* ``patches`` with a ``path`` to an RFC 6902 JSON patch (YAML list of ``add``,
  ``replace``, ``remove`` and ``test``) and a ``target`` of ``kind`` / ``name``.

Needs only PyYAML.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_KNOWN_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "labels",
    "namespace",
    "images",
    "patches",
}
# Kinds that live outside namespaces (the ones these manifests could plausibly use).
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}

Resource = dict[str, Any]


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not implement, or is wrong."""


def find_kustomization(directory: Path) -> Path:
    """The kustomization file inside ``directory``."""
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def load_yaml_documents(path: Path) -> list[Resource]:
    """Every non-empty YAML document in ``path``."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def render(directory: Path | str) -> list[Resource]:
    """Render the kustomization in ``directory`` into a list of resources."""
    return _render(Path(directory).resolve(), expect_kind="Kustomization")


def _render(directory: Path, expect_kind: str) -> list[Resource]:
    kfile = find_kustomization(directory)
    (spec,) = load_yaml_documents(kfile)
    unknown = set(spec) - _KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    kind = spec.get("kind", "Kustomization")
    if kind != expect_kind:
        raise KustomizeError(f"{kfile}: expected kind {expect_kind}, got {kind}")

    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(_render(path, expect_kind="Kustomization"))
        elif path.is_file():
            resources.extend(load_yaml_documents(path))
        else:
            raise KustomizeError(f"{kfile}: resource '{entry}' does not exist")
    _check_unique(resources, kfile)

    # kustomize applies a Component's own transformations to everything accumulated so
    # far, after this kustomization's resources and before its own transformers.
    for entry in spec.get("components", []):
        resources = _apply_component((directory / entry).resolve(), resources)
        _check_unique(resources, kfile)

    return _transform(spec, directory, resources)


def _apply_component(directory: Path, resources: list[Resource]) -> list[Resource]:
    kfile = find_kustomization(directory)
    (spec,) = load_yaml_documents(kfile)
    if spec.get("kind") != "Component":
        raise KustomizeError(f"{kfile}: a component must have kind Component")
    unknown = set(spec) - _KNOWN_FIELDS - {"components"}
    if unknown or spec.get("components"):
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    added: list[Resource] = []
    for entry in spec.get("resources", []):
        added.extend(load_yaml_documents((directory / entry).resolve()))
    return _transform(spec, directory, resources + added)


def _check_unique(resources: list[Resource], where: Path) -> None:
    seen: set[tuple[str, str, str | None]] = set()
    for r in resources:
        key = (r["kind"], r["metadata"]["name"], r["metadata"].get("namespace"))
        if key in seen:
            raise KustomizeError(f"{where}: duplicate resource {key}")
        seen.add(key)


def _transform(spec: Resource, directory: Path, resources: list[Resource]) -> list[Resource]:
    out = copy.deepcopy(resources)
    for patch in spec.get("patches", []):
        _apply_patch_entry(patch, directory, out)
    for label in spec.get("labels", []):
        _apply_labels(label, out)
    for image in spec.get("images", []):
        _apply_image(image, out)
    if "namespace" in spec:
        for r in out:
            if r["kind"] not in _CLUSTER_SCOPED:
                r["metadata"]["namespace"] = spec["namespace"]
    return out


def _apply_labels(entry: Resource, resources: list[Resource]) -> None:
    if set(entry) - {"pairs", "includeSelectors", "includeTemplates"}:
        raise KustomizeError(f"labels: unsupported fields in {entry}")
    if entry.get("includeSelectors"):
        raise KustomizeError("labels: includeSelectors: true is not implemented")
    pairs = entry["pairs"]
    for r in resources:
        r["metadata"].setdefault("labels", {}).update(pairs)
        template = r.get("spec", {}).get("template")
        if entry.get("includeTemplates") and isinstance(template, dict):
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def _apply_image(entry: Resource, resources: list[Resource]) -> None:
    if set(entry) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"images: unsupported fields in {entry}")
    for r in resources:
        pod = r.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, tag = _split_image(container["image"])
            if name != entry["name"]:
                continue
            name = entry.get("newName", name)
            if "digest" in entry:
                container["image"] = f"{name}@{entry['digest']}"
            else:
                tag = entry.get("newTag", tag)
                container["image"] = f"{name}:{tag}" if tag else name


def _split_image(image: str) -> tuple[str, str | None]:
    """'registry:5000/a/b:tag' → ('registry:5000/a/b', 'tag')."""
    if "@" in image:
        return image.split("@", 1)[0], None
    head, _, last = image.rpartition("/")
    if ":" in last:
        repo, tag = last.split(":", 1)
        return (f"{head}/{repo}" if head else repo), tag
    return image, None


def _apply_patch_entry(entry: Resource, directory: Path, resources: list[Resource]) -> None:
    if set(entry) - {"path", "target"} or "path" not in entry:
        raise KustomizeError(f"patches: only 'path' + 'target' entries are supported: {entry}")
    target = entry.get("target") or {}
    if set(target) - {"kind", "name"}:
        raise KustomizeError(f"patches: target may only name kind and name: {target}")
    ops = yaml.safe_load((directory / entry["path"]).read_text())
    if not isinstance(ops, list):
        raise KustomizeError(f"{entry['path']}: only JSON 6902 patches (a list) are supported")
    matched = [
        r
        for r in resources
        if r["kind"] == target.get("kind", r["kind"])
        and r["metadata"]["name"] == target.get("name", r["metadata"]["name"])
    ]
    if not matched:
        raise KustomizeError(f"patches: {entry['path']} matches no resource ({target})")
    for r in matched:
        for op in ops:
            json_patch(r, op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Resource, op: Resource) -> None:
    """Apply one RFC 6902 operation (add, replace, remove, test) to ``doc`` in place."""
    kind = op.get("op")
    if kind not in {"add", "replace", "remove", "test"}:
        raise KustomizeError(f"JSON patch op {kind!r} is not supported")
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        if kind == "add" and last == "-":
            node.append(copy.deepcopy(op["value"]))
            return
        index = int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        elif node[index] != op["value"]:
            raise KustomizeError(f"JSON patch test failed at {op['path']}")
        return
    if kind in {"replace", "remove", "test"} and last not in node:
        raise KustomizeError(f"JSON patch {kind}: {op['path']} does not exist")
    if kind in {"add", "replace"}:
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    elif node[last] != op["value"]:
        raise KustomizeError(f"JSON patch test failed at {op['path']}")


def main(argv: list[str]) -> int:
    """Print the rendered kustomization as a multi-document YAML stream."""
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(argv[0]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
