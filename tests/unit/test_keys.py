"""The keyspace: every key round-trips through parse; bad names are refused."""

from __future__ import annotations

import pytest
from meshserve.cluster.keys import Keyspace, valid_name


@pytest.mark.parametrize(
    ("build", "parsed"),
    [
        (lambda k: k.model("llama-3-8b"), ("models", "llama-3-8b")),
        (lambda k: k.node("gpu-host-1"), ("nodes", "gpu-host-1")),
        (lambda k: k.replica("demo", "n1"), ("replicas", "demo", "n1")),
        (lambda k: k.placement("n1", "demo"), ("placements", "n1", "demo")),
        (lambda k: k.demand("router-1"), ("demand", "router-1")),
    ],
)
def test_round_trip(build, parsed) -> None:  # type: ignore[no-untyped-def]
    keys = Keyspace("/x/")
    key = build(keys)
    assert key.startswith(b"/x/")
    assert keys.parse(key) == parsed


def test_prefixes_contain_their_keys() -> None:
    k = Keyspace()
    assert k.replica("m", "n").startswith(k.replicas())
    assert k.placement("n", "m").startswith(k.placements("n"))
    assert not k.placement("n2", "m").startswith(k.placements("n"))
    assert k.model("m").startswith(k.models())


@pytest.mark.parametrize("name", ["", "a/b", "-lead", "x" * 129, "sp ace", "ü"])
def test_invalid_names_are_refused(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(ValueError, match="invalid model name"):
        Keyspace().model(name)


def test_parse_rejects_foreign_and_malformed_keys() -> None:
    k = Keyspace("/a/")
    with pytest.raises(ValueError, match="outside prefix"):
        k.parse(b"/b/models/x")
    with pytest.raises(ValueError, match="no known shape"):
        k.parse(b"/a/replicas/onlymodel")


def test_prefix_must_be_slash_delimited() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Keyspace("meshserve")
