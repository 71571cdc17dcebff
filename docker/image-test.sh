#!/usr/bin/env bash
# Build the serving image with buildah, run its entrypoint in a working container and send it real requests from
# the host: `make image-test`. Not part of `make test` (debootstrap + pip inside the build take minutes).
#
#   docker/image-test.sh                    as root, with buildah (apt-get install buildah debootstrap)
#
# Environment:
#   BASE_IMAGE  (default endoflow/debian-py311:12) built with docker/make-base.sh (debootstrap) when missing
#   IMAGE       (default endoflow/serve:image-test) the serving image built from docker/Dockerfile.serve
#   REBUILD=1   rebuild IMAGE even when it exists;  PORT (default: a free one) the host port to serve on
#   PYTHON      (default .venv/bin/python) the host interpreter that exports the model and sends the requests
# The build's RUN steps get the host's CA bundle and pip.conf (a TLS-intercepting proxy needs them); `buildah run`
# shares the host network (chroot isolation), so the entrypoint's 0.0.0.0:PORT is the host's.
set -euo pipefail
cd "$(dirname "$0")/.."

base=${BASE_IMAGE:-endoflow/debian-py311:12}
image=${IMAGE:-endoflow/serve:image-test}
python=${PYTHON:-.venv/bin/python}
start=$(date +%s)
step() { echo "[image-test +$(($(date +%s) - start))s] $*"; }

command -v buildah >/dev/null || { echo "image-test: buildah is not installed (apt-get install buildah)" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "image-test: run as root (buildah chroot builds and debootstrap need it)" >&2; exit 2; }

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    step "base image $base missing: building it with debootstrap (docker/make-base.sh)"
    OUT=$(mktemp -d) bash docker/make-base.sh "$base"
fi

if [[ ${REBUILD:-0} == 1 ]] || ! buildah inspect --type image "$image" >/dev/null 2>&1; then
    step "building $image from docker/Dockerfile.serve on $base"
    mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    [[ -f /etc/pip.conf ]] && mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
    buildah bud --isolation chroot --format docker "${mounts[@]}" --build-arg "BASE_IMAGE=$base" \
        -f docker/Dockerfile.serve -t "$image" .
fi
step "image $image: $(buildah images --format '{{.Size}}' "$image")"

work=$(mktemp -d "${TMPDIR:-/tmp}/endoflow-image-test.XXXXXX")
container=""
server_pid=""
cleanup() {
    if [[ -n $server_pid ]]; then  # the whole session: buildah, the entrypoint and its Ray processes
        kill -TERM -- "-$server_pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 -- "-$server_pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    [[ -n $container ]] && buildah rm "$container" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

step "exporting a tiny untrained segmenter on the host"
"$python" - "$work/model" <<'EOF'
import sys
from pathlib import Path
from training.export import export_segmenter
from training.models.unet import Segmenter, UNetConfig
export_segmenter(Segmenter(UNetConfig(base_width=4, depth=2)), Path(sys.argv[1]) / "model.onnx", input_size=64)
EOF
chmod -R a+rX "$work"  # the image runs as uid 1000

port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# Ray Serve opens many files: the default soft limit of 1024 is not enough for the proxy and the replica.
container=$(buildah from --ulimit nofile=16384:16384 "$image")
step "running the entrypoint in $container on port $port"
token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')  # the API's bearer token (ENDOFLOW_API_TOKEN)
# setsid: its own session, so cleanup stops every process under it (a non-interactive shell's background job is
# not a group leader, so setsid execs in place and $! is the session id).
setsid buildah run --isolation chroot --network host --env "ENDOFLOW_API_TOKEN=$token" \
    -v "$work/model:/models:ro" "$container" -- \
    python /app/serve_entry.py --model /models/model.onnx --port "$port" --threads 1 >"$work/serve.log" 2>&1 &
server_pid=$!

step "sending requests from the host"
if ! "$python" - "$port" "$server_pid" "$token" <<'EOF'; then
import io, json, os, sys, time
import httpx
import numpy as np
from PIL import Image

port, pid, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 240
while True:
    try:
        health = httpx.get(f"{base}/healthz", timeout=5)
        if health.status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline or not os.path.exists(f"/proc/{pid}"):
        sys.exit("the serving container did not answer /healthz (see its log below)")
    time.sleep(2)
print("healthz:", health.json())
assert health.json()["status"] == "ok", health.text

image = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
body = io.BytesIO()
Image.fromarray(image).save(body, format="PNG")
denied = httpx.post(f"{base}/v1/segment", content=body.getvalue(), timeout=60)
assert denied.status_code == 401, (denied.status_code, denied.text)
print("no token:", denied.status_code, denied.json())
auth = {"authorization": f"Bearer {token}"}
reply = httpx.post(f"{base}/v1/segment", content=body.getvalue(), headers={"content-type": "image/png"} | auth, timeout=60)
assert reply.status_code == 200, (reply.status_code, reply.text)
labels = np.asarray(Image.open(io.BytesIO(reply.content)))
assert labels.shape == (96, 128), labels.shape
assert labels.max() < 7, labels.max()
print("segment: label map", labels.shape, "classes", sorted(np.unique(labels).tolist()))
areas = httpx.post(f"{base}/v1/segment?format=json", content=body.getvalue(), headers=auth, timeout=60)
assert areas.status_code == 200, areas.text
print("segment?format=json:", json.dumps(areas.json())[:200])
bad = httpx.post(f"{base}/v1/segment", content=b"not an image", headers=auth, timeout=60)
assert 400 <= bad.status_code < 500, (bad.status_code, bad.text)
print("bad body:", bad.status_code, bad.json())
EOF
    echo "---- container log ----" >&2
    tail -50 "$work/serve.log" >&2
    exit 1
fi
step "image-test passed"
