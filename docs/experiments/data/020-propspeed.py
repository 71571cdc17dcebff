"""onnxruntime stream frames/s at 256x256, 2 threads: scratch vs lite0-imagenet key encoder (untrained heads)."""

import json
import tempfile
from pathlib import Path

import torch

from pipelines.bench_propagate import stream_fps
from training.data.simulator import simulate_sequences
from training.models.propagation.network import PropagationConfig, PropagationNet
from training.propagate.export import OnnxBackend, export_propagation
from training.propagate.inference import MemoryPolicy

frames_s, labels_s = simulate_sequences(1, 60, seed=4243, style="real-like", size=256)
frames, labels = frames_s[0], labels_s[0][0]
policy = MemoryPolicy()
out = {}
for enc in ("scratch", "lite0-imagenet"):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        graphs = export_propagation(
            PropagationNet(PropagationConfig(key_encoder=enc)).eval(), Path(d), enc, 256, policy
        )
        out[enc] = round(stream_fps(OnnxBackend(graphs, threads=2), frames, labels, policy), 1)
print(json.dumps(out))
