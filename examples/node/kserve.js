// Talks to a meshserve router through the KServe v2 / Open Inference Protocol with
// @grpc/grpc-js (the protocol's `inference.GRPCInferenceService`, as Triton serves it): checks
// liveness, lists the repository, then streams a completion with ModelStreamInfer (decoupled:
// one response per text delta, the last with `triton_final_response`).
//
//   npm install && node kserve.js [ROUTER host:port] [MODEL] [PROMPT]
//
// Environment: MESHSERVE_API_KEY (when the router has tenants), MESHSERVE_MAX_TOKENS (16).
// Prints the text as it streams, then one JSON line; exits 1 with the error on failure.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const definition = loader.loadSync("meshserve/kserve/grpc_service.proto", {
  includeDirs: [PROTOS],
  keepCase: true,
  longs: Number,
  defaults: true,
});
const { inference } = grpc.loadPackageDefinition(definition);

const [address = "127.0.0.1:50051", model = "demo", prompt = "Once upon a time"] =
  process.argv.slice(2);
const client = new inference.GRPCInferenceService(address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
if (process.env.MESHSERVE_API_KEY) {
  metadata.set("authorization", `Bearer ${process.env.MESHSERVE_API_KEY}`);
}
const deadline = () => ({ deadline: new Date(Date.now() + 60_000) });

// BYTES tensor elements in the protocol's raw form: a 4-byte little-endian length, the bytes.
function packBytes(text) {
  const data = Buffer.from(text, "utf8");
  const length = Buffer.alloc(4);
  length.writeUInt32LE(data.length);
  return Buffer.concat([length, data]);
}

function unpackBytes(raw) {
  const out = [];
  for (let i = 0; i < raw.length; ) {
    const n = raw.readUInt32LE(i);
    out.push(raw.subarray(i + 4, i + 4 + n).toString("utf8"));
    i += 4 + n;
  }
  return out;
}

function unary(method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, metadata, deadline(), (err, reply) => (err ? reject(err) : resolve(reply))),
  );
}

async function main() {
  const live = (await unary("ServerLive", {})).live;
  const index = (await unary("RepositoryIndex", {})).models.map((m) => [m.name, m.state]);
  const sampling = JSON.stringify({
    max_tokens: Number(process.env.MESHSERVE_MAX_TOKENS || 16),
    temperature: 0,
  });
  const request = {
    model_name: model,
    id: "node-1",
    inputs: [
      { name: "text_input", datatype: "BYTES", shape: [1] },
      { name: "sampling_parameters", datatype: "BYTES", shape: [1] },
    ],
    raw_input_contents: [packBytes(prompt), packBytes(sampling)],
  };
  const call = client.ModelStreamInfer(metadata, deadline());
  let responses = 0;
  await new Promise((resolve, reject) => {
    call.on("data", (msg) => {
      if (msg.error_message) {
        reject(new Error(msg.error_message));
        call.end();
        return;
      }
      responses += 1;
      const reply = msg.infer_response;
      process.stdout.write(unpackBytes(reply.raw_output_contents[0]).join(""));
      const final = reply.parameters.triton_final_response;
      if (final && final.bool_param) {
        call.end();
        resolve();
      }
    });
    call.on("error", reject);
    call.write(request);
  });
  process.stdout.write("\n" + JSON.stringify({ live, index, responses }) + "\n");
}

main()
  .catch((err) => {
    console.error(`\n${err.code !== undefined ? grpc.status[err.code] + ": " : ""}${err.details || err.message}`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
