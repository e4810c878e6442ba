#!/usr/bin/env python3
"""Drives containerd's CRI endpoint the way the kubelet does, for Ember's tests.

The CRI v1 stubs are generated at run time from api.proto (beside this file)
with grpc_tools.protoc into $CRI_STUBS_DIR, else a temporary directory removed
at exit, so nothing generated is checked in.

Usage:
  cri.py ENDPOINT script
      Reads one JSON request a line on stdin and answers each with one JSON
      line on stdout: {"ok": true, ...} or {"ok": false, "code": "NOT_FOUND",
      "details": "..."} for a gRPC error. The Rust tests (tests/src/containerd.rs)
      drive this mode. Requests are listed in OPS below.
  cri.py ENDPOINT bench --image REF [--handler ember] [-n N] [--log-dir DIR]
      Runs one host-network pod, then N times CreateContainer + StartContainer
      of IMAGE (StartContainer returns once the module is ready), timing each
      pair, then stops and removes each container outside the timing; prints
      one JSON line {"n": N, "p50_ms": .., "p99_ms": .., "samples_ms": [..]}.

ENDPOINT is a gRPC address such as unix:///tmp/x/containerd.sock.
"""

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time


def _protoc_include():
    import grpc_tools

    return os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")


def stubs():
    try:
        import grpc
        from grpc_tools import protoc
    except ImportError as e:
        sys.exit(
            f"cri.py needs grpcio and grpcio-tools ({e}): "
            "python3 -m pip install grpcio grpcio-tools"
        )
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.environ.get("CRI_STUBS_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
    else:
        out = tempfile.mkdtemp(prefix="ember-cri-stubs-")
        atexit.register(shutil.rmtree, out, True)
    shutil.copy(os.path.join(here, "api.proto"), out)
    rc = protoc.main(
        [
            "protoc",
            f"-I{out}",
            f"-I{_protoc_include()}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(out, "api.proto"),
        ]
    )
    if rc != 0:
        sys.exit(f"grpc_tools.protoc failed on api.proto (exit {rc})")
    sys.path.insert(0, out)
    import api_pb2
    import api_pb2_grpc

    return grpc, api_pb2, api_pb2_grpc


grpc, pb, pbg = stubs()

STATES = {
    pb.CONTAINER_CREATED: "CREATED",
    pb.CONTAINER_RUNNING: "RUNNING",
    pb.CONTAINER_EXITED: "EXITED",
    pb.CONTAINER_UNKNOWN: "UNKNOWN",
}


class Driver:
    """One CRI connection plus the sandbox configs CreateContainer needs again."""

    def __init__(self, endpoint, timeout=60):
        self.channel = grpc.insecure_channel(endpoint)
        self.rt = pbg.RuntimeServiceStub(self.channel)
        self.im = pbg.ImageServiceStub(self.channel)
        self.timeout = timeout
        self.sandboxes = {}

    # Each op takes the request's fields and returns a dict merged into the reply.

    def version(self):
        v = self.rt.Version(pb.VersionRequest(version="v1"), timeout=self.timeout)
        return {
            "runtime_name": v.runtime_name,
            "runtime_version": v.runtime_version,
            "runtime_api_version": v.runtime_api_version,
        }

    def image_status(self, image):
        r = self.im.ImageStatus(
            pb.ImageStatusRequest(image=pb.ImageSpec(image=image)), timeout=self.timeout
        )
        return {"id": r.image.id, "size": r.image.size}

    def run_sandbox(self, name, log_dir, handler="ember", namespace="default", uid=None,
                    network="node"):
        """A pod on the host's network ("node") or in its own namespace ("pod")."""
        modes = {"node": pb.NODE, "pod": pb.POD}
        cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(
                name=name, namespace=namespace, uid=uid or f"uid-{name}", attempt=0
            ),
            log_directory=log_dir,
            linux=pb.LinuxPodSandboxConfig(
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=modes[network])
                )
            ),
        )
        r = self.rt.RunPodSandbox(
            pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler),
            timeout=self.timeout,
        )
        self.sandboxes[r.pod_sandbox_id] = cfg
        return {"id": r.pod_sandbox_id}

    def sandbox_status(self, sandbox):
        r = self.rt.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox, verbose=True),
            timeout=self.timeout,
        )
        ready = r.status.state == pb.SANDBOX_READY
        # The network namespace CRI made for the pod (none on the host's
        # network), from the sandbox's OCI spec in the verbose info.
        netns = None
        try:
            spec = json.loads(r.info.get("info", "{}")).get("runtimeSpec") or {}
            for ns in (spec.get("linux") or {}).get("namespaces") or []:
                if ns.get("type") == "network":
                    netns = ns.get("path")
        except ValueError:
            pass
        return {
            "state": "READY" if ready else "NOTREADY",
            "ip": r.status.network.ip,
            "netns": netns,
        }

    def stop_sandbox(self, sandbox):
        self.rt.StopPodSandbox(
            pb.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=self.timeout
        )
        return {}

    def remove_sandbox(self, sandbox):
        self.rt.RemovePodSandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=self.timeout
        )
        self.sandboxes.pop(sandbox, None)
        return {}

    def create(self, sandbox, name, image, log_path=None, memory_limit=0, cpu_quota=0,
               cpu_period=0, args=None):
        cfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image=image),
            args=args or [],
            log_path=log_path or f"{name}.log",
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(
                    memory_limit_in_bytes=memory_limit,
                    cpu_quota=cpu_quota,
                    cpu_period=cpu_period,
                )
            ),
        )
        r = self.rt.CreateContainer(
            pb.CreateContainerRequest(
                pod_sandbox_id=sandbox,
                config=cfg,
                sandbox_config=self.sandboxes[sandbox],
            ),
            timeout=self.timeout,
        )
        return {"id": r.container_id}

    def start(self, container):
        self.rt.StartContainer(
            pb.StartContainerRequest(container_id=container), timeout=self.timeout
        )
        return {}

    def status(self, container):
        r = self.rt.ContainerStatus(
            pb.ContainerStatusRequest(container_id=container, verbose=True),
            timeout=self.timeout,
        )
        s = r.status
        pid = None
        try:
            pid = json.loads(r.info.get("info", "{}")).get("pid")
        except ValueError:
            pass
        return {
            "state": STATES.get(s.state, str(s.state)),
            "exit_code": s.exit_code,
            "reason": s.reason,
            "message": s.message,
            "log_path": s.log_path,
            "pid": pid,
        }

    def stop(self, container, timeout=10):
        self.rt.StopContainer(
            pb.StopContainerRequest(container_id=container, timeout=timeout),
            timeout=self.timeout + timeout,
        )
        return {}

    def remove(self, container):
        self.rt.RemoveContainer(
            pb.RemoveContainerRequest(container_id=container), timeout=self.timeout
        )
        return {}

    def update(self, container, memory_limit=0, cpu_quota=0, cpu_period=0):
        self.rt.UpdateContainerResources(
            pb.UpdateContainerResourcesRequest(
                container_id=container,
                linux=pb.LinuxContainerResources(
                    memory_limit_in_bytes=memory_limit,
                    cpu_quota=cpu_quota,
                    cpu_period=cpu_period,
                ),
            ),
            timeout=self.timeout,
        )
        return {}

    def exec_sync(self, container, cmd, timeout=5):
        r = self.rt.ExecSync(
            pb.ExecSyncRequest(container_id=container, cmd=cmd, timeout=timeout),
            timeout=self.timeout,
        )
        return {
            "exit_code": r.exit_code,
            "stdout": r.stdout.decode(errors="replace"),
            "stderr": r.stderr.decode(errors="replace"),
        }

    def list_containers(self, sandbox=None):
        f = pb.ContainerFilter(pod_sandbox_id=sandbox) if sandbox else None
        r = self.rt.ListContainers(pb.ListContainersRequest(filter=f), timeout=self.timeout)
        return {
            "containers": [
                {"id": c.id, "name": c.metadata.name, "state": STATES.get(c.state, str(c.state))}
                for c in r.containers
            ]
        }

    def bench(self, sandbox, image, n, name="bench"):
        """N × (CreateContainer + StartContainer), timed; cleanup untimed."""
        samples = []
        for i in range(n):
            t0 = time.perf_counter_ns()
            cid = self.create(sandbox, f"{name}-{i}", image)["id"]
            self.start(cid)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            self.stop(cid, timeout=5)
            self.remove(cid)
        s = sorted(samples)

        def pct(p):
            return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

        return {"n": n, "p50_ms": pct(50), "p99_ms": pct(99), "samples_ms": samples}


OPS = {
    "version": Driver.version,
    "image_status": Driver.image_status,
    "run_sandbox": Driver.run_sandbox,
    "sandbox_status": Driver.sandbox_status,
    "stop_sandbox": Driver.stop_sandbox,
    "remove_sandbox": Driver.remove_sandbox,
    "create": Driver.create,
    "start": Driver.start,
    "status": Driver.status,
    "stop": Driver.stop,
    "remove": Driver.remove,
    "update": Driver.update,
    "exec_sync": Driver.exec_sync,
    "list_containers": Driver.list_containers,
    "bench": Driver.bench,
}


def answer(driver, req):
    op = req.pop("op", None)
    if op not in OPS:
        return {"ok": False, "code": "BAD_REQUEST", "details": f"unknown op {op!r}; ops: {sorted(OPS)}"}
    try:
        reply = OPS[op](driver, **req)
    except TypeError as e:
        return {"ok": False, "code": "BAD_REQUEST", "details": f"{op}: {e}"}
    except grpc.RpcError as e:
        return {"ok": False, "code": e.code().name, "details": e.details()}
    return {"ok": True, **reply}


def script(driver):
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
        except ValueError as e:
            reply = {"ok": False, "code": "BAD_REQUEST", "details": f"not JSON: {e}"}
        else:
            reply = answer(driver, req)
        print(json.dumps(reply), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("script")
    b = sub.add_parser("bench")
    b.add_argument("--image", required=True)
    b.add_argument("--handler", default="ember")
    b.add_argument("-n", type=int, default=50)
    b.add_argument("--log-dir", default=None)
    a = p.parse_args()
    d = Driver(a.endpoint)
    if a.cmd == "script":
        script(d)
        return
    log_dir = a.log_dir or tempfile.mkdtemp(prefix="ember-cri-bench-logs-")
    sb = d.run_sandbox("ember-bench", log_dir, handler=a.handler)["id"]
    try:
        print(json.dumps(d.bench(sb, a.image, a.n)), flush=True)
    finally:
        d.stop_sandbox(sb)
        d.remove_sandbox(sb)
        if a.log_dir is None:
            shutil.rmtree(log_dir, True)


if __name__ == "__main__":
    main()
