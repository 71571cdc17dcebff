# EndoFlow — `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench venv clean sysdeps

# (Re)create the virtualenv only when the dependency pins change.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/endoflow demo

test: $(STAMP) sysdeps
	$(PY) -m pytest -q --durations=15 tests

# Everything but the tests marked slow (those that start Ray or train a model): the quick loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not slow" tests

# Debian packages some tests drive (headless Chromium for the web page). Installed when missing and we are root;
# otherwise those tests skip and say why.
sysdeps:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (Debian) for the web page test"; \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
		echo "sysdeps: could not install chromium; the web page test will skip" >&2; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(VENV)/bin/endoflow bench segment --out runs/bench/segment.json

clean:
	rm -rf runs

# --- containers and Kubernetes (docker/README.md, k8s/README.md) ---------------------------------------------
IMAGE_REPO ?= endoflow
IMAGE_TAG  ?= 0.1.0
# e.g. BUILD_ARGS='--build-arg BASE_IMAGE=my-registry/debian-py311:12' for an air-gapped base
BUILD_ARGS ?=

.PHONY: k8s-validate images

k8s-validate: $(STAMP)
	bash k8s/validate.sh

# Both images: Docker when an engine answers, else buildah (no daemon; chroot isolation works unprivileged in a
# container; --format docker keeps the HEALTHCHECK, which OCI images drop).
images:
	@if docker info >/dev/null 2>&1; then \
		set -e; \
		docker build -f docker/Dockerfile.train -t $(IMAGE_REPO)/train:$(IMAGE_TAG) $(BUILD_ARGS) .; \
		docker build -f docker/Dockerfile.serve -t $(IMAGE_REPO)/serve:$(IMAGE_TAG) $(BUILD_ARGS) .; \
	elif command -v buildah >/dev/null 2>&1; then \
		set -e; \
		buildah bud --isolation chroot --format docker -f docker/Dockerfile.train \
			-t $(IMAGE_REPO)/train:$(IMAGE_TAG) $(BUILD_ARGS) .; \
		buildah bud --isolation chroot --format docker -f docker/Dockerfile.serve \
			-t $(IMAGE_REPO)/serve:$(IMAGE_TAG) $(BUILD_ARGS) .; \
	else \
		echo "make images: no container engine: 'docker info' failed and buildah is not installed." >&2; \
		echo "  Start Docker, or install buildah (apt-get install buildah); see docker/README.md." >&2; \
		exit 1; \
	fi

# --- mask propagation: trains runs/artifacts/propagate-bench.pt first if it is missing (65 min or more on 2 cores) ---
.PHONY: bench-propagate

# ENSEMBLE=3: also trains seeds 1 and 2 (as long again each) and scores the ensemble of the three as real_ensemble
ENSEMBLE ?= 1

# KEY_ENCODER=lite0-imagenet: the same bench with the ImageNet Lite0 key encoder, in propagate-lite0-imagenet.json
KEY_ENCODER ?= scratch
BENCH_PROPAGATE_JSON = runs/bench/propagate$(if $(filter scratch,$(KEY_ENCODER)),,-$(KEY_ENCODER)).json

bench-propagate: $(STAMP)
	$(VENV)/bin/endoflow bench propagate --out $(BENCH_PROPAGATE_JSON) --ensemble $(ENSEMBLE) --key-encoder $(KEY_ENCODER)

# --- sim→real adaptation ladder (source-only → FDA → learned CUT translator → IRB → + pseudo-labels → oracle), on the
# embedded real-like simulator and, when present, on vocalfolds seq1-3 (unlabelled) → seq4: from scratch at 128 px
# (~15-30 min each, 2 cores) and with the ImageNet Lite0 encoder at 256 px (about an hour more) ---
.PHONY: bench-adapt

bench-adapt: $(STAMP)
	nice -n 10 $(VENV)/bin/endoflow bench adapt --out runs/bench/adapt.json
	@if [ -d ../shared/data/vocalfolds/img ]; then \
		set -e; \
		nice -n 10 $(VENV)/bin/endoflow bench adapt --real-data ../shared/data/vocalfolds --real-layout vocalfolds \
			--train-sequences seq1,seq2,seq3 --eval-sequences seq4 --out runs/bench/adapt-vocalfolds.json \
			--set runs_dir=runs/bench/adapt-vocalfolds; \
		nice -n 10 $(VENV)/bin/endoflow bench adapt --real-data ../shared/data/vocalfolds --real-layout vocalfolds \
			--train-sequences seq1,seq2,seq3 --eval-sequences seq4 --out runs/bench/adapt-vocalfolds-lite0-256.json \
			--set runs_dir=runs/bench/adapt-vocalfolds-lite0-256 --set size=256 --set model.encoder=lite0-imagenet; \
	else echo "bench-adapt: ../shared/data/vocalfolds absent, embedded ladder only"; fi

# --- a new patient from K labelled frames; needs runs/artifacts/propagate-bench.pt (make bench-propagate) ---
.PHONY: bench-patient
bench-patient: $(STAMP)
	nice -n 10 $(VENV)/bin/endoflow bench patient --out runs/bench/patient.json

# --- serving benchmark: bare onnxruntime vs the service (v2 binary, REST PNG; Ray's proxy, HAProxy, HAProxy with user
# code on Serve's loop; an echo deployment as the HTTP floor) vs naive FastAPI + torch, at concurrency 1/8/32, plus
# WebSocket propagation streams (~7 min on 2 cores) ---
.PHONY: bench-serve

bench-serve: $(STAMP)
	ulimit -n 16384 2>/dev/null || true; $(VENV)/bin/endoflow bench serve --out runs/bench/serve.json

# --- cluster jobs, MLflow stack, image test (pipelines/cluster.py, pipelines/mlflow_stack.py, docker/image-test.sh) ---
# train-cluster / sweep: on $RAY_ADDRESS (a dashboard URL) when set, else a local 2-node cluster started and stopped
# here; K8S=1 applies the overlay's RayJob instead (OVERLAY, default k8s/overlays/cpu). ARGS: extra --set overrides.
.PHONY: train-cluster sweep mlflow image-test
OVERLAY ?= k8s/overlays/cpu
CLUSTER_FLAGS = $(if $(filter 1,$(K8S)),--k8s --overlay $(OVERLAY),) $(ARGS)

train-cluster: $(STAMP)
	$(PY) -m pipelines.cluster train $(CLUSTER_FLAGS)

sweep: $(STAMP)
	$(PY) -m pipelines.cluster sweep $(CLUSTER_FLAGS)

# PostgreSQL + S3 (moto) + `mlflow server` in the foreground; prints the environment to export. Ctrl-C stops it.
mlflow: $(STAMP)
	$(PY) -m pipelines.mlflow_stack

# Builds the serving image with buildah (and its debootstrap base if missing), serves from it, queries it.
# Installs Debian's buildah and debootstrap first when they are missing and we are root.
image-test: $(STAMP) image-tools
	bash docker/image-test.sh

.PHONY: image-tools
image-tools:
	@missing=$$(for tool in buildah debootstrap; do command -v $$tool >/dev/null 2>&1 || printf '%s ' $$tool; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $$missing (Debian) for the image test"; \
		apt-get install -y -qq $$missing >/dev/null 2>&1 || \
			(apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $$missing >/dev/null 2>&1) || \
			{ echo "image-tools: could not install $$missing" >&2; exit 1; }; \
	fi
