"""What one replica serves: the segmentation model, and optionally the propagation graphs with the session host
their streams live in, each following its reference (a registry alias may move).

Each is resolved, its sha256 taken and its metadata parsed once; a background thread re-resolves the references
every `reload_interval_s` and swaps in what changed. Every swap is one attribute store, so a request that reads
`loaded` or `propagator` once sees the old model or the new, never half of each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from serving.codec import make_palette
from serving.errors import RequestError
from serving.loaded import LoadedModel
from serving.metrics import ServiceMetrics
from serving.onnx_model import OnnxSegmenter, Provider
from serving.propagation import OnnxPropagator
from serving.propagation_graphs import resolve_graphs
from serving.resolve import ResolvedModel, resolve_model
from serving.session_host import ReplicaHost

log = logging.getLogger("ray.serve")


class ServedModels:
    def __init__(
        self,
        model_ref: str,
        propagation_ref: str | None,
        host: ReplicaHost,
        *,
        providers: Sequence[Provider],
        threads: int | None,
        cache_dir: str | None,
        tracking_uri: str | None,
        metrics: ServiceMetrics,
    ) -> None:
        self.model_ref, self.propagation_ref, self.host = model_ref, propagation_ref, host
        self.providers, self.threads = providers, threads
        self.cache_dir, self.tracking_uri, self.metrics = cache_dir, tracking_uri, metrics
        self.loaded = self._load(resolve_model(model_ref, cache_dir, tracking_uri))
        self.propagator: OnnxPropagator | None = None
        if propagation_ref:
            graphs = resolve_graphs(propagation_ref, cache_dir, tracking_uri)
            self.propagator = OnnxPropagator(graphs, providers, threads)
            host.start(graphs)

    def _load(self, resolved: ResolvedModel) -> LoadedModel:
        model = OnnxSegmenter(resolved.path, self.providers, self.threads)
        return LoadedModel(resolved, model, make_palette(len(model.class_names)))

    def require_propagator(self) -> OnnxPropagator:
        if (propagator := self.propagator) is None:
            raise RequestError(404, "this server has no propagation model (start it with propagation_model=...)")
        return propagator

    def health(self) -> dict[str, Any]:
        health: dict[str, Any] = {"status": "ok", "model": self.loaded.identity}
        if (propagator := self.propagator) is not None:
            health["propagation"] = {"ref": self.propagation_ref, **propagator.identity}
        return health

    def follow(self, interval_s: float) -> None:
        """Re-resolve every `interval_s` in a daemon thread (0: never)."""
        if interval_s > 0:
            threading.Thread(target=self._reload_loop, args=(interval_s,), daemon=True).start()

    def _reload_loop(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            self.reload_segmenter()
            if self.propagation_ref:
                self.reload_propagator(self.propagation_ref)

    def reload_segmenter(self) -> None:
        try:
            resolved = resolve_model(self.model_ref, self.cache_dir, self.tracking_uri)
            if resolved.sha256 != self.loaded.resolved.sha256:
                self.loaded = self._load(resolved)  # one attribute store: requests see old or new, never half
                self.metrics.reloads.inc()
                log.warning("model %s moved: now serving sha256 %s", self.model_ref, resolved.sha256)
        except Exception as err:  # a registry hiccup must not take down a replica that serves fine
            log.warning("re-resolving %s failed, still serving the previous model: %s", self.model_ref, err)

    def reload_propagator(self, ref: str) -> None:
        """Swap in the propagation graphs `ref` now names, if any of the three changed.

        The swap is one attribute store, so a request (REST or v2) sees the old three graphs or the new three, never
        a mix; the session host swaps first, so once /healthz names the new version new streams start on it too.
        Open streams keep the propagator they were opened with (Stream.model), deliberately: their memory
        holds keys and values from the old encoders, which the new segment graph cannot read, so they finish on the
        old graphs (freed with the last such stream) and only streams opened afterwards use the new ones. Closing
        them would cut every live video at each alias move for no gain in correctness. v2 clients keep their memory
        themselves and pin the version; theirs answers 404 after a swap. While a registry's three aliases are being
        moved one by one the graphs come from two exports: OnnxPropagator refuses that, and the next round retries.
        """
        try:
            graphs = resolve_graphs(ref, self.cache_dir, self.tracking_uri)
            current = self.propagator
            if current is None or {g: r.sha256 for g, r in graphs.items()} != current.sha256:
                propagator = OnnxPropagator(graphs, self.providers, self.threads)  # refuses a mixed set
                if self.host.handle is not None:
                    self.host.swap(graphs)
                self.propagator = propagator
                self.metrics.reloads.inc()
                log.warning("propagation model %s moved: now serving version %s", ref, propagator.version)
        except Exception as err:  # as above: keep serving what works
            log.warning("re-resolving %s failed, still serving the previous propagation graphs: %s", ref, err)
