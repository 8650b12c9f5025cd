#!/usr/bin/env python3
"""A Python client of Tessera's public gRPC API (tessera.v1), generated from proto/ at run time.

It lists the nodes, plans a model, deploys it with the probe engine, follows the events until the
deployment runs, and deletes it. Nothing generated is committed: the stubs are built from the
.proto files with grpcio-tools into a temporary directory on every run.

    python3 -m pip install -r examples/python/requirements.txt
    python3 examples/python/client.py --head 127.0.0.1:7470 --token-file /var/lib/tessera/head/admin.token \
        --model examples/model-configs/Llama-3.1-8B-Instruct.json
"""

import argparse
import os
import sys
import tempfile

from grpc_tools import protoc

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto", "proto")


def generate(out_dir):
    """Compiles every tessera/v1/*.proto into out_dir and makes it importable."""
    protos = sorted(
        os.path.join("tessera", "v1", f)
        for f in os.listdir(os.path.join(PROTO_ROOT, "tessera", "v1"))
        if f.endswith(".proto")
    )
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        sys.exit("error: generating the Python stubs from proto/ failed")
    sys.path.insert(0, out_dir)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head", default="127.0.0.1:7470", help="host:port of the head")
    p.add_argument("--token-file", help="file with the admin token")
    p.add_argument("--token", default=os.environ.get("TESSERA_TOKEN"), help="the admin token")
    p.add_argument("--model", required=True, help="model directory or config.json (path on the head)")
    p.add_argument("--name", default="py-demo", help="deployment name")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    a = p.parse_args()
    token = a.token
    if a.token_file:
        with open(a.token_file) as f:
            token = f.readline().strip()
    metadata = [("authorization", f"Bearer {token}")] if token else []

    with tempfile.TemporaryDirectory() as gen:
        generate(gen)
        from tessera.v1 import cluster_pb2, cluster_pb2_grpc, deploy_pb2, deploy_pb2_grpc, plan_pb2, plan_pb2_grpc

        channel = grpc.insecure_channel(a.head)
        cluster = cluster_pb2_grpc.ClusterStub(channel)
        planner = plan_pb2_grpc.PlannerStub(channel)
        deployments = deploy_pb2_grpc.DeploymentsStub(channel)
        model = os.path.abspath(a.model)

        nodes = cluster.ListNodes(cluster_pb2.ListNodesRequest(), metadata=metadata).nodes
        print(f"{len(nodes)} node(s):")
        for n in nodes:
            state = cluster_pb2.NodeState.Name(n.state)
            print(f"  {n.name:<12} {state:<20} {n.address:<15} {len(n.inventory.gpus)} GPU(s){' (head)' if n.is_head else ''}")

        plan = planner.Plan(plan_pb2.PlanRequest(model_path=model, tp=a.tp, pp=a.pp), metadata=metadata)
        print(f"plan: valid={plan.valid} tp={plan.tp} pp={plan.pp} nodes={plan.nnodes} kv_tokens={plan.memory.kv_cache_tokens}")
        for e in plan.errors:
            print(f"  error [{e.rule}] {e.message}")
        if not plan.valid:
            sys.exit(1)

        # Watch first, so the deployment's events are not missed.
        events = cluster.WatchEvents(cluster_pb2.WatchEventsRequest(include_current=False), metadata=metadata)
        d = deployments.Create(
            deploy_pb2.CreateDeploymentRequest(name=a.name, model_path=model, tp=a.tp, pp=a.pp, engine=deploy_pb2.ENGINE_PROBE),
            metadata=metadata,
        )
        print(f"created {d.name}: {deploy_pb2.DeploymentState.Name(d.state)}")
        for e in events:
            if e.HasField("deployment") and e.deployment.name == a.name:
                state = deploy_pb2.DeploymentState.Name(e.deployment.state)
                print(f"  event: {state} generation {e.deployment.generation}: {e.reason}")
                if e.deployment.state == deploy_pb2.DEPLOYMENT_STATE_RUNNING:
                    break
                if e.deployment.state == deploy_pb2.DEPLOYMENT_STATE_FAILED:
                    sys.exit(f"error: {a.name} failed: {e.deployment.message}")
        events.cancel()
        got = deployments.Get(deploy_pb2.GetDeploymentRequest(name=a.name), metadata=metadata)
        for r in got.ranks:
            print(f"  rank {r.rank} on {r.node} GPU {list(r.gpu_indices)} pid {r.pid}")
        print(f"{a.name} is running")

        deployments.Delete(deploy_pb2.DeleteDeploymentRequest(name=a.name), metadata=metadata)
        while True:
            try:
                deployments.Get(deploy_pb2.GetDeploymentRequest(name=a.name), metadata=metadata)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    break
                raise
        print(f"{a.name} deleted")


if __name__ == "__main__":
    main()
