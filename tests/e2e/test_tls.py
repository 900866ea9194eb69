"""The whole mesh over mutual TLS (a local CA, as `meshserve up --tls` makes): etcd with client
certificates and etcd auth, every service's server and channel. Streams work; a plaintext
client, a client with a certificate from another CA, and an etcd client without a certificate
(or whose certificate names no etcd user) are refused."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
import pytest
from meshserve.certs import make_ca
from meshserve.cluster.etcd_process import EtcdProcess
from meshserve.localmesh import Mesh
from meshserve.tls import TlsFiles, channel_credentials, open_channel
from meshserve.v1 import inference_pb2

from tests.e2e.conftest import apply, model_spec
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("tls")
    m = Mesh(root, lease_ttl_s=2, tls=True)
    saved = {k: os.environ.get(k) for k in m.tls_env}
    os.environ.update(m.tls_env)  # this test process is a client of the mesh too
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_agent("agent-0")
        m.start_router(extra=["--http-listen", "127.0.0.1:0"])
        asyncio.run(apply(m, model_spec("demo", demo_model, min_replicas=1)))

        async def ready() -> bool:
            async with open_channel(m.services["router"].address) as ch:
                got = await inference_pb2_grpc.InferenceStub(ch).ListModels(
                    inference_pb2.ListModelsRequest(), timeout=5
                )
            return any(x.name == "demo" and x.ready_replicas for x in got.models)

        asyncio.run(eventually(ready, 90, "demo READY over TLS"))
        yield m
    finally:
        m.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def request() -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model="demo", prompt="Once upon a time")
    r.sampling.max_tokens, r.sampling.ignore_eos = 8, True
    return r


async def tokens(ch: grpc.aio.Channel) -> int:
    n = 0
    async for m in inference_pb2_grpc.InferenceStub(ch).Generate(request(), timeout=20):
        n += len(m.token_ids)
    return n


async def test_streams_work_over_mutual_tls_on_every_hop(smesh: Mesh) -> None:
    for name in ("router", "agent-0"):  # router → agent, and a client → agent directly
        async with open_channel(smesh.services[name].address) as ch:
            assert await tokens(ch) == 8


async def test_a_plaintext_client_is_refused(smesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(smesh.services["router"].address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await tokens(ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_another_ca_is_refused(smesh: Mesh, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other", "someone else's CA")
    stranger = other.issue("stranger")
    # It trusts our CA (it could have fetched it), but presents a certificate we never signed.
    ours_ca = os.environ["MESHSERVE_TLS_CA"]
    creds = channel_credentials(TlsFiles(str(stranger.cert), str(stranger.key), ours_ca))
    for name in ("router", "agent-0"):
        async with grpc.aio.secure_channel(smesh.services[name].address, creds) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await tokens(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, name


def test_etcd_refuses_clients_without_a_certificate_or_a_user(smesh: Mesh) -> None:
    etcd = smesh.etcd
    assert isinstance(etcd, EtcdProcess)  # a TLS mesh runs one member
    sec = etcd.security
    assert sec is not None
    ours = TlsFiles(
        os.environ["MESHSERVE_TLS_CERT"], os.environ["MESHSERVE_TLS_KEY"], sec.server.ca
    )
    got = etcd.etcdctl("get", "--prefix", "/meshserve/", "--keys-only", who=ours)
    assert got.returncode == 0 and "/meshserve/v1/models/demo" in got.stdout, got.stderr
    # No certificate at all: the TLS handshake fails.
    bare = etcd.etcdctl_raw("--cacert", sec.server.ca, "get", "--prefix", "/meshserve/")
    assert bare.returncode != 0 and "/meshserve/v1/models" not in bare.stdout
    # A certificate from our CA whose common name is no etcd user: permission denied.
    nobody_cert = smesh_issue(smesh, "nobody")
    denied = etcd.etcdctl("get", "--prefix", "/meshserve/", who=nobody_cert)
    assert denied.returncode != 0 and "/meshserve/v1/models" not in denied.stdout
    assert "permission denied" in denied.stderr or "user name not found" in denied.stderr, (
        denied.stderr
    )


def smesh_issue(mesh: Mesh, name: str) -> TlsFiles:
    from meshserve.certs import LocalPki

    d = mesh.data_dir / "tls"
    pki = LocalPki(d / "ca.pem", d / "ca-key.pem", d)
    issued = pki.issue(name)
    return TlsFiles(str(issued.cert), str(issued.key), str(pki.ca))


async def test_the_health_command_probes_over_tls(smesh: Mesh) -> None:
    """What the manifests' exec probes run: SERVING with the certificate, refused without."""
    address = smesh.services["router"].address
    argv = [sys.executable, "-m", "meshserve", "health", address, "--service"]
    ok = await asyncio.to_thread(
        subprocess.run, [*argv, "meshserve.v1.Inference"], capture_output=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_TLS_")}
    refused = await asyncio.to_thread(
        subprocess.run,
        [*argv, "meshserve.v1.Inference"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**plain, "MESHSERVE_HOME": str(smesh.data_dir / "nohome")},
    )
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr, refused.stderr


async def test_a_client_certificate_subject_names_a_tenant(smesh: Mesh) -> None:
    """A router with tenants: the certificate's subject (CN=meshserve, the one this client
    presents) is a tenant without a key; it may use only what that tenant may."""
    tenants = smesh.data_dir / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        "  - name: by-cert\n"
        "    cert_subjects: [CN=meshserve]\n"
        "    models: [demo]\n"
        "  - name: narrow\n"
        "    cert_subjects: [CN=nobody]\n"
        "    models: [other]\n"
    )
    router = await asyncio.to_thread(
        smesh.start_router, "router-tenants", "127.0.0.1:0", ["--tenants", str(tenants)]
    )
    async with open_channel(router.address) as ch:
        assert await tokens(ch) == 8  # no API key: the certificate said who we are
    nobody = smesh_issue(smesh, "nobody")
    async with grpc.aio.secure_channel(router.address, channel_credentials(nobody)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await tokens(ch)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "narrow" in (e.value.details() or "")


def test_the_openai_front_is_https_with_client_certificates(smesh: Mesh) -> None:
    import ssl
    import urllib.error
    import urllib.request

    url = f"https://{smesh.services['router'].info['http']}/v1/models"
    ctx = ssl.create_default_context(cafile=os.environ["MESHSERVE_TLS_CA"])
    ctx.load_cert_chain(os.environ["MESHSERVE_TLS_CERT"], os.environ["MESHSERVE_TLS_KEY"])
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        assert r.status == 200 and b'"demo"' in r.read()
    bare = ssl.create_default_context(cafile=os.environ["MESHSERVE_TLS_CA"])  # no client cert
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(url, context=bare, timeout=10).read()
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext HTTP
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=10).read()
