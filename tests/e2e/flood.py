"""A flooding client in a process of its own (so the test's own event loop measures only its
requests): ``python -m tests.e2e.flood ADDRESS API_KEY STREAMS TOKENS``. Streams requests
back to back until SIGTERM, lets those in flight finish, then prints one JSON line: how many
completed, and every failure by status code (a refused or failed flood request is not hidden)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys

import grpc
import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
from meshserve.v1 import inference_pb2


async def main(address: str, key: str, streams: int, tokens: int) -> dict[str, object]:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    done = 0
    errors: collections.Counter[str] = collections.Counter()
    request = inference_pb2.GenerateRequest(model="demo", prompt="Once upon a time")
    request.sampling.max_tokens, request.sampling.ignore_eos = tokens, True
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def one() -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    call = stub.Generate(
                        request, timeout=60, metadata=(("authorization", f"Bearer {key}"),)
                    )
                    async for _ in call:
                        pass
                    done += 1
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] += 1

        print("flooding", flush=True)
        await asyncio.gather(*(one() for _ in range(streams)))
    return {"served": done, "errors": dict(errors)}


if __name__ == "__main__":
    # The flooding clients stand for other machines: on this shared test machine they yield the
    # CPU to the mesh under test rather than compete with it.
    os.nice(19)
    address, key, streams, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(asyncio.run(main(address, key, streams, tokens))), flush=True)
