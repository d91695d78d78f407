"""Validates the objects of rendered manifests that kubernetes-validate has no schema for.

kubernetes-validate only knows the built-in kinds: for a custom resource (here KEDA's
ScaledObject and TriggerAuthentication) it prints a WARN and passes. This script makes
that gap explicit instead of silent:

- every object kubernetes-validate has a schema for is left to it (it is run separately,
  with --strict);
- every object of a KEDA kind is validated against cloudcoil's models of KEDA's CRDs
  (PyPI cloudcoil-models-keda, generated from KEDA's own CRD schemas), made strict:
  a field the CRD does not define is an error, as kubernetes-validate --strict does for
  built-in kinds;
- any other object without a schema fails the run.

Usage: python validate-crds.py KUBERNETES_VERSION FILE...
"""

import sys

import pydantic
import yaml
from kubernetes_validate import utils

import cloudcoil.apimachinery as apimachinery
from cloudcoil.models.keda import v1alpha1 as keda


def strict_models(*modules):
    """Every pydantic model of the modules refuses fields it does not define."""
    models = [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, pydantic.BaseModel)
    ]
    for model in models:
        model.model_config = {**model.model_config, "extra": "forbid"}
    for model in models:
        model.model_rebuild(force=True)


strict_models(apimachinery, keda)

KEDA_KINDS = {
    "ScaledObject": keda.ScaledObject,
    "ScaledJob": keda.ScaledJob,
    "TriggerAuthentication": keda.TriggerAuthentication,
    "ClusterTriggerAuthentication": keda.ClusterTriggerAuthentication,
}


def main() -> int:
    version, files = sys.argv[1], sys.argv[2:]
    failures = builtin = custom = 0
    for filename in files:
        with open(filename) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        for obj in objects:
            name = f"{obj.get('kind', '?').lower()}/{obj.get('metadata', {}).get('name', '?')}"
            try:
                utils.validate(obj, version, strict=True)
                builtin += 1
                continue
            except utils.SchemaNotFoundError:
                pass
            except Exception:  # reported by the kubernetes-validate run itself
                builtin += 1
                continue
            model = KEDA_KINDS.get(obj.get("kind"))
            if model is None or not obj.get("apiVersion", "").startswith("keda.sh/"):
                print(f"ERROR {filename} {name}: no schema for {obj.get('apiVersion')} {obj.get('kind')}")
                failures += 1
                continue
            try:
                model.model_validate(obj)
                print(f"INFO {filename} passed for resource {name} against KEDA's CRD (cloudcoil-models-keda, strict)")
                custom += 1
            except pydantic.ValidationError as e:
                print(f"ERROR {filename} {name} did not validate against KEDA's CRD: {e}")
                failures += 1
    print(f"validate-crds: {builtin} objects with a Kubernetes schema (checked by kubernetes-validate), "
          f"{custom} KEDA objects checked here, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
