"""Runs under .venv-triton (tritonclient[http]), as a KServe v2 REST client would:
``python triton_http_client.py HTTP_ADDRESS LLM TENSOR_MODEL`` prints one JSON object of what it
saw (LLM: text in, text out; TENSOR_MODEL: an image classifier, 3x32x32 in, logits and class_id
out), with binary tensor data (tritonclient's default) and with JSON data."""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main(address: str, llm: str, tensor_model: str) -> dict[str, object]:
    c = httpclient.InferenceServerClient(address)
    out: dict[str, object] = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "server": c.get_server_metadata()["name"],
        "model_ready": c.is_model_ready(llm),
        "missing_ready": c.is_model_ready("no-such-model"),
    }
    meta = c.get_model_metadata(llm)
    out["inputs"] = [(t["name"], t["datatype"]) for t in meta["inputs"]]
    out["config_name"] = c.get_model_config(llm)["name"]
    text = httpclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Once upon a time"], dtype=object))
    params = httpclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(
        np.array([json.dumps({"max_tokens": 12, "temperature": 0}).encode()], dtype=object)
    )
    result = c.infer(llm, [text, params], outputs=[httpclient.InferRequestedOutput("text_output")])
    out["llm_text"] = result.as_numpy("text_output")[0].decode()
    as_json = c.infer(
        llm,
        [text, params],
        outputs=[httpclient.InferRequestedOutput("text_output", binary_data=False)],
    )
    out["llm_text_json"] = str(as_json.as_numpy("text_output")[0])
    try:
        c.infer("no-such-model", [text])
        out["missing_model"] = "accepted"
    except InferenceServerException as e:
        out["missing_model"] = f"{e.status()}: {e.message()}"

    tmeta = c.get_model_metadata(tensor_model)
    out["t_inputs"] = [(t["name"], t["datatype"], t["shape"]) for t in tmeta["inputs"]]
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    wanted = [httpclient.InferRequestedOutput(n) for n in ("class_id", "logits")]
    for binary in (True, False):
        image = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
        image.set_data_from_numpy(x, binary_data=binary)
        got = c.infer(tensor_model, [image], outputs=wanted)
        out[f"t_logits_{binary}"] = got.as_numpy("logits").tolist()
        out[f"t_class_id_{binary}"] = got.as_numpy("class_id").tolist()
    out["t_image"] = x.tolist()
    bad = httpclient.InferInput("pixel_values", [1, 3, 16, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    try:
        c.infer(tensor_model, [bad])
        out["t_bad_shape"] = "accepted"
    except InferenceServerException as e:
        out["t_bad_shape"] = f"{e.status()}: {e.message()}"
    stats = c.get_inference_statistics(tensor_model)["model_stats"][0]
    out["t_stats_success"] = stats["inference_stats"]["success"]["count"]
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3])))
