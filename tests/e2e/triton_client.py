"""Runs under .venv-triton (tritonclient[grpc], protobuf < 7), as a KServe v2 client would:
``python triton_client.py ROUTER_ADDRESS MODEL TENSOR_MODEL`` prints one JSON object of what it
saw (MODEL: an LLM; TENSOR_MODEL: an image classifier, 3x32x32 in, logits and class_id out)."""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(address: str, model: str) -> dict[str, object]:
    c = grpcclient.InferenceServerClient(address)
    out: dict[str, object] = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "server": c.get_server_metadata().name,
    }
    c.load_model(model)  # = ensure replicas; returns once one serves
    out["model_ready"] = c.is_model_ready(model)
    out["index"] = [(m.name, m.state) for m in c.get_model_repository_index().models]
    meta = c.get_model_metadata(model)
    out["inputs"] = [(t.name, t.datatype) for t in meta.inputs]
    out["outputs"] = [(t.name, t.datatype) for t in meta.outputs]
    out["config_name"] = c.get_model_config(model).config.name

    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Once upon a time"], dtype=object))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(
        np.array([json.dumps({"max_tokens": 12, "temperature": 0}).encode()], dtype=object)
    )
    result = c.infer(
        model, [text, params], outputs=[grpcclient.InferRequestedOutput("text_output")]
    )
    whole = result.as_numpy("text_output")[0].decode()
    out["infer_text"] = whole

    got: queue.Queue[Any] = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put(error or result))
    c.async_stream_infer(model, [text, params], request_id="s1")
    deltas, final = [], False
    while not final:
        item = got.get(timeout=60)
        if isinstance(item, InferenceServerException):
            raise item
        deltas.append(item.as_numpy("text_output")[0].decode())
        final = item.get_response().parameters["triton_final_response"].bool_param
    bad = grpcclient.InferInput("text_input", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"x"], dtype=object))
    c.async_stream_infer("no-such-model", [bad], request_id="s2")
    error = got.get(timeout=30)
    c.stop_stream()
    out["stream_deltas"] = len(deltas)
    out["stream_text"] = "".join(deltas)
    out["stream_error"] = str(error)
    try:
        c.infer(model, [params])  # no text_input
        out["missing_input"] = "accepted"
    except InferenceServerException as e:
        out["missing_input"] = f"{e.status()}: {e.message()}"
    stats = c.get_inference_statistics(model).model_stats[0]
    out["stats_success"] = stats.inference_stats.success.count
    out["stats_fail"] = stats.inference_stats.fail.count
    c.unload_model(model)
    return out


def tensors(address: str, model: str) -> dict[str, object]:
    """The image classifier through ModelInfer, as Triton clients run any tensor model."""
    c = grpcclient.InferenceServerClient(address)
    meta = c.get_model_metadata(model)
    config = c.get_model_config(model).config
    out: dict[str, object] = {
        "t_inputs": [(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
        "t_outputs": [(t.name, t.datatype, list(t.shape)) for t in meta.outputs],
        "t_max_batch": config.max_batch_size,
        "t_dims": list(config.input[0].dims),
        "t_window_us": config.dynamic_batching.max_queue_delay_microseconds,
    }
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    image = grpcclient.InferInput("pixel_values", list(x.shape), "FP32")
    image.set_data_from_numpy(x)
    wanted = [grpcclient.InferRequestedOutput(n) for n in ("class_id", "logits")]
    result = c.infer(model, [image], outputs=wanted)
    out["t_logits"] = result.as_numpy("logits").tolist()
    out["t_class_id"] = result.as_numpy("class_id").tolist()
    out["t_image"] = x.tolist()
    bad = grpcclient.InferInput("pixel_values", [1, 3, 16, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    try:
        c.infer(model, [bad])
        out["t_bad_shape"] = "accepted"
    except InferenceServerException as e:
        out["t_bad_shape"] = f"{e.status()}: {e.message()}"
    return out


if __name__ == "__main__":
    seen = main(sys.argv[1], sys.argv[2])
    seen.update(tensors(sys.argv[1], sys.argv[3]))
    print(json.dumps(seen))
