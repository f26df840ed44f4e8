"""The gRPC contract: generated modules import, messages round-trip, the generated code is fresh."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mfh_api.proto import pb, pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_PROTO = REPO_ROOT / "scripts" / "gen_proto.py"
GENERATED = Path("mfh_client") / "_generated"


def _run_gen(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GEN_PROTO), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """A scratch copy of the repo's proto/ and generated dir, so --check can be made to fail."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "proto", root / "proto")
    shutil.copytree(
        REPO_ROOT / GENERATED,
        root / GENERATED,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return root


def test_generated_modules_import() -> None:
    assert pb.DESCRIPTOR.name == "mfh/v1/memory_fusion.proto"
    assert pb.DESCRIPTOR.package == "mfh.v1"
    service = pb.DESCRIPTOR.services_by_name["MemoryFusion"]
    assert [m.name for m in service.methods] == [
        "Get",
        "BatchGet",
        "Put",
        "BatchPut",
        "Delete",
        "List",
        "Watch",
        "Search",
        "ListNamespaces",
    ]
    assert service.methods_by_name["Watch"].server_streaming
    assert hasattr(pb_grpc, "MemoryFusionStub")
    assert hasattr(pb_grpc, "MemoryFusionServicer")
    assert hasattr(pb_grpc, "add_MemoryFusionServicer_to_server")


def test_record_field_numbers_are_stable() -> None:
    fields = {f.name: f.number for f in pb.Record.DESCRIPTOR.fields}
    assert fields == {
        "namespace": 1,
        "key": 2,
        "kind": 3,
        "payload_json": 4,
        "version": 5,
        "origin": 6,
        "deleted": 7,
        "updated_at_ms": 8,
        "schema_version": 9,
    }
    assert pb.DURABILITY_UNSPECIFIED == 0
    assert pb.DURABILITY_ACCEPTED == 1
    assert pb.DURABILITY_PERSISTED == 2


def test_the_search_fields_are_numbered_as_documented() -> None:
    def numbers(msg: type) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.PutRequest)["ttl_seconds"] == 4
    assert numbers(pb.SearchRequest) == {
        "namespace": 1,
        "namespace_prefix": 2,
        "query": 3,
        "filters": 4,
        "embedding": 5,
        "top_k": 6,
    }
    assert numbers(pb.ListNamespacesRequest) == {"prefix": 1, "max_depth": 2, "page_size": 3, "page_token": 4}


def test_record_round_trips() -> None:
    record = pb.Record(
        namespace="agents.main",
        key="session:42/notes",
        kind="memory_item",
        payload_json='{"content":"héllo","schema_version":1}',
        version=(1_700_000_000_000 << 16) | 7,
        origin="main_pc",
        deleted=False,
        updated_at_ms=1_700_000_000_000,
        schema_version=1,
    )
    data = record.SerializeToString(deterministic=True)
    again = pb.Record.FromString(data)
    assert again == record
    assert again.version == (1_700_000_000_000 << 16) | 7
    assert again.payload_json == '{"content":"héllo","schema_version":1}'


def test_expected_version_has_presence() -> None:
    unconditional = pb.PutRequest(record=pb.Record(namespace="n", key="k"))
    must_not_exist = pb.PutRequest(record=pb.Record(namespace="n", key="k"), expected_version=0)
    assert not pb.PutRequest.FromString(unconditional.SerializeToString()).HasField("expected_version")
    assert pb.PutRequest.FromString(must_not_exist.SerializeToString()).HasField("expected_version")
    assert unconditional.durability == pb.DURABILITY_UNSPECIFIED


def test_stub_and_servicer_talk() -> None:
    """The generated client and server halves work together over a real channel."""
    from concurrent import futures

    import grpc

    class Servicer(pb_grpc.MemoryFusionServicer):  # type: ignore[misc]
        def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
            if request.key != "k1":
                context.abort(grpc.StatusCode.NOT_FOUND, f"no record {request.namespace}/{request.key}")
            return pb.GetResponse(record=pb.Record(namespace=request.namespace, key=request.key, version=5))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_MemoryFusionServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.MemoryFusionStub(channel)
            reply = stub.Get(pb.GetRequest(namespace="ns", key="k1"), timeout=10)
            assert reply.record.version == 5
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(pb.GetRequest(namespace="ns", key="nope"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                stub.Put(pb.PutRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)


def test_check_passes_on_committed_tree() -> None:
    result = _run_gen("--check", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_passes_from_another_cwd(tree_copy: Path, tmp_path: Path) -> None:
    result = _run_gen("--check", "--root", str(tree_copy), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_on_edited_generated_file(tree_copy: Path) -> None:
    target = tree_copy / GENERATED / "memory_fusion_pb2_grpc.py"
    target.write_text(target.read_text(encoding="utf-8") + "# edited by hand\n", encoding="utf-8")
    result = _run_gen("--check", "--root", str(tree_copy), cwd=tree_copy)
    assert result.returncode != 0
    assert "stale:      mfh_client/_generated/memory_fusion_pb2_grpc.py" in result.stderr
    assert "python scripts/gen_proto.py" in result.stderr


def test_check_fails_on_missing_or_unexpected_file(tree_copy: Path) -> None:
    (tree_copy / GENERATED / "memory_fusion_pb2.pyi").unlink()
    (tree_copy / GENERATED / "old_pb2.py").write_text("# left over\n", encoding="utf-8")
    result = _run_gen("--check", "--root", str(tree_copy), cwd=tree_copy)
    assert result.returncode != 0
    assert "missing:    mfh_client/_generated/memory_fusion_pb2.pyi" in result.stderr
    assert "unexpected: mfh_client/_generated/old_pb2.py" in result.stderr


def test_check_fails_when_proto_changes(tree_copy: Path) -> None:
    proto = tree_copy / "proto" / "mfh" / "v1" / "memory_fusion.proto"
    proto.write_text(proto.read_text(encoding="utf-8") + "\nmessage Extra {}\n", encoding="utf-8")
    result = _run_gen("--check", "--root", str(tree_copy), cwd=tree_copy)
    assert result.returncode != 0
    assert "stale:      mfh_client/_generated/memory_fusion_pb2.py" in result.stderr


def test_regenerate_repairs_and_is_deterministic(tree_copy: Path) -> None:
    target = tree_copy / GENERATED / "memory_fusion_pb2.py"
    target.write_text("# broken\n", encoding="utf-8")
    (tree_copy / GENERATED / "old_pb2_grpc.py").write_text("# left over\n", encoding="utf-8")
    first = _run_gen("--root", str(tree_copy), cwd=tree_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    assert not (tree_copy / GENERATED / "old_pb2_grpc.py").exists()
    for name in ("__init__.py", "memory_fusion_pb2.py", "memory_fusion_pb2.pyi", "memory_fusion_pb2_grpc.py"):
        assert (tree_copy / GENERATED / name).read_bytes() == (REPO_ROOT / GENERATED / name).read_bytes(), name
    second = _run_gen("--root", str(tree_copy), cwd=tree_copy)
    assert second.returncode == 0
    assert "wrote" not in second.stdout
    assert _run_gen("--check", "--root", str(tree_copy), cwd=tree_copy).returncode == 0


def test_grpc_module_uses_relative_import() -> None:
    text = (REPO_ROOT / GENERATED / "memory_fusion_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from . import memory_fusion_pb2 as" in text
    assert "from mfh.v1 import" not in text
