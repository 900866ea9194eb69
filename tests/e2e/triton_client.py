"""Runs under .venv-triton (tritonclient[grpc], protobuf < 7), as a KServe v2 client would:
``python triton_client.py ROUTER_ADDRESS MODEL`` prints one JSON object of what it saw."""

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


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
