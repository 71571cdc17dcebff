"""Benchmark baseline (d): the server a user would write without EndoFlow's serving stack.

FastAPI + torch eager, one request at a time through the model, PNG in -> PNG label map out. Started by
pipelines/bench_serve.py as `uvicorn pipelines.naive_torch_server:app` with ENDOFLOW_NAIVE_CHECKPOINT naming a
file saved by bench_serve.prepare (config + state_dict) and ENDOFLOW_NAIVE_THREADS the torch thread count.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image

from training.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from training.models.unet import Segmenter, UNetConfig

torch.set_num_threads(int(os.environ.get("ENDOFLOW_NAIVE_THREADS", "1")))
_checkpoint = torch.load(os.environ["ENDOFLOW_NAIVE_CHECKPOINT"], map_location="cpu", weights_only=True)
model = Segmenter(UNetConfig.model_validate_json(_checkpoint["config"]), pretrained=False).eval()
model.load_state_dict(_checkpoint["state_dict"])
SIZE = int(_checkpoint["input_size"])
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
app = FastAPI()


@app.post("/v1/segment")
async def segment_raw(request: Request) -> Response:
    image = Image.open(io.BytesIO(await request.body())).convert("RGB")
    width, height = image.size
    pixels = torch.from_numpy(np.array(image.resize((SIZE, SIZE)))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        labels = model((pixels - MEAN) / STD).argmax(1)[0].to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST).save(out, format="PNG")
    return Response(out.getvalue(), media_type="image/png")
