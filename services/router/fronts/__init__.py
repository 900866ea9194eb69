"""The router's protocol fronts: native gRPC, OpenAI HTTP, KServe v2 (gRPC). Each translates
its protocol to and from the core."""
