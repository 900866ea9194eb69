// Streams a completion from a meshserve router with @grpc/grpc-js, loading meshserve's own
// .proto files at run time (no code generation step).
//
//   npm install && node generate.js [ROUTER host:port] [MODEL] [PROMPT]
//
// Environment: MESHSERVE_API_KEY (when the router has tenants), MESHSERVE_MAX_TOKENS (32),
// MESHSERVE_TEMPERATURE (the model's default when unset; 0 = greedy).
// Prints the text as it streams, then one JSON line with the usage; exits 1 with the gRPC
// status and meshserve's error reason on failure.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const definition = loader.loadSync("meshserve/v1/inference.proto", {
  includeDirs: [PROTOS],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const { meshserve } = grpc.loadPackageDefinition(definition);

const [address = "127.0.0.1:50051", model = "demo", prompt = "Once upon a time"] =
  process.argv.slice(2);
const client = new meshserve.v1.Inference(address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
if (process.env.MESHSERVE_API_KEY) {
  metadata.set("authorization", `Bearer ${process.env.MESHSERVE_API_KEY}`);
}
const request = {
  model,
  prompt,
  sampling: { max_tokens: Number(process.env.MESHSERVE_MAX_TOKENS || 32) },
};
if (process.env.MESHSERVE_TEMPERATURE !== undefined) {
  request.sampling.temperature = Number(process.env.MESHSERVE_TEMPERATURE); // 0 = greedy
}
const deadline = new Date(Date.now() + 60_000);
const call = client.Generate(request, metadata, { deadline });
let tokens = 0;
call.on("data", (msg) => {
  process.stdout.write(msg.text);
  tokens += msg.token_ids.length;
  if (msg.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
    const usage = msg.usage || {};
    process.stdout.write(
      "\n" + JSON.stringify({ tokens, finish_reason: msg.finish_reason, usage }) + "\n",
    );
  }
});
call.on("error", (err) => {
  const reason = err.metadata && err.metadata.get("grpc-status-details-bin").length
    ? " (see google.rpc.Status details)"
    : "";
  console.error(`\n${grpc.status[err.code]}: ${err.details}${reason}`);
  process.exitCode = 1;
});
call.on("end", () => client.close());
