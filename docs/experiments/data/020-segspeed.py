import json

from pipelines.bench import BENCH_MODELS, onnx_frames_per_second
from training.models.unet import Segmenter

print(
    json.dumps(
        {
            name: onnx_frames_per_second(Segmenter(BENCH_MODELS[name]).eval())
            for name in ("default", "lite0_imagenet", "default", "lite0_imagenet")
        }
    )
)
