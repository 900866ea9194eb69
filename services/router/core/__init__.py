"""The router's transport-neutral core: admission, the attempt policy (retries, breakers,
failover), the endpoint table, demand and per-request accounting. Fronts (``fronts/``) only
translate their protocol to and from it."""
