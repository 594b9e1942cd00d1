"""A loopback RunPod: the part of RunPod's GraphQL API the executor uses, on 127.0.0.1.

The runpod SDK honours ``RUNPOD_API_BASE_URL``, so pointing it here exercises the executor
and the SDK exactly as against api.runpod.io. The queries are parsed and executed with
graphql-core against a schema written after RunPod's (https://graphql-spec.runpod.io), so a
query RunPod would reject is rejected here too.

Each pod runs its container command as a local subprocess: the worker image's entrypoint
(``python -m gpu.train``, gpu/Dockerfile) with the pod's environment, on CPU, so checkpoints,
webhooks and resume are all real. The pod volume (``/runpod-volume``) is a local folder.

Test controls: ``preempt(pod_id)`` (kill the worker, report the pod gone, or stopped with
``mode="exited"``: what RunPod does to an outbid spot pod), ``capacity[gpu_id] = 0`` (no
machine), ``fail_next(n)`` (answer 503 with an HTML page), ``add_pod(...)`` (a pod nobody
created through the API, e.g. an orphan), ``image_commands`` (what an image runs).

Differences from RunPod, on purpose: a container whose command exits leaves its pod EXITED
(RunPod restarts the container; the platform terminates pods when a job ends either way);
``podStop`` sends SIGTERM and waits up to ``stop_grace_s`` before SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from graphql import build_schema, graphql_sync

REPO = Path(__file__).resolve().parents[2]
NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)

SDL = """
enum CloudTypeEnum { ALL SECURE COMMUNITY }

input EnvironmentVariableInput { key: String! value: String! }

input PodFindAndDeployOnDemandInput {
  name: String, imageName: String, gpuTypeId: String, cloudType: CloudTypeEnum, gpuCount: Int,
  volumeInGb: Int, containerDiskInGb: Int, minVcpuCount: Int, minMemoryInGb: Int,
  dockerArgs: String, ports: String, volumeMountPath: String, env: [EnvironmentVariableInput],
  templateId: String, networkVolumeId: String, dataCenterId: String, countryCode: String,
  startSsh: Boolean, supportPublicIp: Boolean, allowedCudaVersions: [String],
  minDownload: Int, minUpload: Int, instanceId: String, stopAfter: String, terminateAfter: String
}

input PodRentInterruptableInput {
  bidPerGpu: Float!, name: String, imageName: String, gpuTypeId: String,
  cloudType: CloudTypeEnum, gpuCount: Int, volumeInGb: Int, containerDiskInGb: Int,
  minVcpuCount: Int, minMemoryInGb: Int, dockerArgs: String, ports: String,
  volumeMountPath: String, env: [EnvironmentVariableInput], templateId: String,
  networkVolumeId: String, dataCenterId: String, countryCode: String, startSsh: Boolean,
  supportPublicIp: Boolean, allowedCudaVersions: [String]
}

input PodFilter { podId: String! }
input PodStopInput { podId: String! }
input PodResumeInput { podId: String!, gpuCount: Int }
input PodTerminateInput { podId: String! }
input GpuTypeFilter { id: String }
input GpuLowestPriceInput { gpuCount: Int, secureCloud: Boolean, communityCloud: Boolean }

type LowestPrice { minimumBidPrice: Float, uninterruptablePrice: Float, stockStatus: String }

type GpuType {
  id: String!, displayName: String, manufacturer: String, memoryInGb: Int, cudaCores: Int,
  secureCloud: Boolean, communityCloud: Boolean, securePrice: Float, communityPrice: Float,
  oneMonthPrice: Float, threeMonthPrice: Float, oneWeekPrice: Float,
  communitySpotPrice: Float, secureSpotPrice: Float, maxGpuCount: Int,
  lowestPrice(input: GpuLowestPriceInput): LowestPrice
}

type PortMapping { ip: String, isIpPublic: Boolean, privatePort: Int, publicPort: Int, type: String }
type PodRuntime { uptimeInSeconds: Int, ports: [PortMapping] }
type PodMachine { gpuDisplayName: String, podHostId: String }

type Pod {
  id: String!, name: String, imageName: String, desiredStatus: String, lastStatusChange: String,
  costPerHr: Float, containerDiskInGb: Int, dockerArgs: String, dockerId: String,
  env: [String], gpuCount: Int, machineId: String, memoryInGb: Float, podType: String,
  port: Int, ports: String, uptimeSeconds: Int, vcpuCount: Float, volumeInGb: Float,
  volumeMountPath: String, runtime: PodRuntime, machine: PodMachine
}

type NetworkVolume { id: String, name: String, size: Int, dataCenterId: String }
type User { id: String, pubKey: String, pods: [Pod], networkVolumes: [NetworkVolume] }

type Query {
  gpuTypes(input: GpuTypeFilter): [GpuType]
  pod(input: PodFilter!): Pod
  myself: User
}

type Mutation {
  podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput): Pod
  podRentInterruptable(input: PodRentInterruptableInput!): Pod
  podStop(input: PodStopInput!): Pod
  podResume(input: PodResumeInput!): Pod
  podTerminate(input: PodTerminateInput!): String
}
"""

GPU_TYPES = [
    {
        "id": "NVIDIA H100 PCIe",
        "displayName": "H100 PCIe",
        "manufacturer": "Nvidia",
        "memoryInGb": 80,
        "secureCloud": True,
        "communityCloud": True,
        "securePrice": 2.39,
        "communityPrice": 1.99,
        "secureSpotPrice": 1.25,
        "communitySpotPrice": 0.99,
        "maxGpuCount": 8,
        "lowestPrice": {"minimumBidPrice": 0.99, "uninterruptablePrice": 1.99},
    },
    {
        "id": "NVIDIA A100 80GB PCIe",
        "displayName": "A100 PCIe",
        "manufacturer": "Nvidia",
        "memoryInGb": 80,
        "secureCloud": True,
        "communityCloud": True,
        "securePrice": 1.64,
        "communityPrice": 1.19,
        "secureSpotPrice": 0.82,
        "communitySpotPrice": 0.6,
        "maxGpuCount": 8,
        "lowestPrice": {"minimumBidPrice": 0.6, "uninterruptablePrice": 1.19},
    },
]


class _QueryError(Exception):
    pass


@dataclass
class LoopbackPod:
    id: str
    name: str
    image: str
    gpu_type_id: str
    gpu_count: int
    env: dict[str, str]
    spot: bool
    bid_per_gpu: float | None
    cost_per_hour: float
    volume_mount_path: str
    docker_args: str = ""
    desired_status: str = "RUNNING"
    last_status_change: str = ""
    process: subprocess.Popen | None = None
    started_at: float = field(default_factory=time.monotonic)
    log_path: Path | None = None
    exit_code: int | None = None

    def as_graphql(self) -> dict:
        alive = self.process is not None and self.process.poll() is None
        running = self.desired_status == "RUNNING" and alive
        return {
            "id": self.id,
            "name": self.name,
            "imageName": self.image,
            "desiredStatus": self.desired_status,
            "lastStatusChange": self.last_status_change,
            "costPerHr": self.cost_per_hour,
            "dockerArgs": self.docker_args,
            "env": [f"{k}={v}" for k, v in self.env.items()],
            "gpuCount": self.gpu_count,
            "machineId": "loopback",
            "podType": "INTERRUPTABLE" if self.spot else "RESERVED",
            "volumeMountPath": self.volume_mount_path,
            "uptimeSeconds": int(time.monotonic() - self.started_at) if running else 0,
            "runtime": {"uptimeInSeconds": int(time.monotonic() - self.started_at), "ports": []}
            if running
            else None,
            "machine": {"gpuDisplayName": self.gpu_type_id, "podHostId": f"{self.id}-host"},
        }


class LoopbackRunPod:
    """Start with ``with LoopbackRunPod(...) as server`` (or start()/stop()); ``server.url``
    is the RUNPOD_API_BASE_URL."""

    def __init__(
        self,
        *,
        api_key: str = "loopback-key",
        volume_dir: Path | None = None,
        log_dir: Path | None = None,
        stop_grace_s: float = 10.0,
        extra_env: dict | None = None,
    ):
        self.api_key = api_key
        self.volume_dir = Path(volume_dir) if volume_dir else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.stop_grace_s = stop_grace_s
        self.extra_env = dict(extra_env or {})
        self.gpu_types = json.loads(json.dumps(GPU_TYPES))
        self.capacity: dict[str, int] = {}  # gpu id -> pods still available (absent: plenty)
        self.spot_capacity: dict[str, int] = {}
        self.image_commands: dict[str, list[str]] = {}
        self.pods: dict[str, LoopbackPod] = {}
        self.requests: list[dict] = []  # every query received (operation text, api key)
        self.terminated: list[str] = []
        self._failures: list[int] = []
        self._lock = threading.RLock()
        self._schema = build_schema(SDL)
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackRunPod:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, payload, content_type = server._handle(
                    self.path, self.headers.get("Authorization", ""), body
                )
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for pod in list(self.pods.values()):
            self._kill(pod)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LoopbackRunPod:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ controls
    def fail_next(self, n: int = 1, status: int = 503) -> None:
        with self._lock:
            self._failures.extend([status] * n)

    def preempt(self, pod_id: str, *, mode: str = "gone") -> None:
        """Kill the pod's worker for real; the pod is then gone (or stopped, mode="exited")."""
        with self._lock:
            pod = self.pods[pod_id]
            self._kill(pod)
            if mode == "gone":
                del self.pods[pod_id]
            else:
                pod.desired_status = "EXITED"
                pod.last_status_change = "Interrupted: outbid (spot instance reclaimed)"

    def add_pod(self, *, name: str, image: str = "loopback/sleeper", gpu_type_id: str = "") -> str:
        """A pod that exists on the account without the platform having asked for it."""
        return self._deploy(
            {
                "name": name,
                "imageName": image,
                "gpuTypeId": gpu_type_id or self.gpu_types[0]["id"],
                "gpuCount": 1,
                "env": [],
                "volumeMountPath": "/runpod-volume",
            },
            spot=False,
            bid=None,
            check_capacity=False,
        )["id"]

    def live_pods(self) -> list[LoopbackPod]:
        with self._lock:
            return list(self.pods.values())

    def pod_processes_alive(self) -> list[str]:
        with self._lock:
            return [p.id for p in self.pods.values() if p.process and p.process.poll() is None]

    # ------------------------------------------------------------------ HTTP
    def _handle(self, path: str, authorization: str, body: bytes):
        with self._lock:
            if self._failures:
                status = self._failures.pop(0)
                return status, b"<html><body>502 Bad Gateway</body></html>", "text/html"
        if path.split("?")[0] != "/graphql":
            return 404, {"errors": [{"message": "not found"}]}, "application/json"
        if authorization != f"Bearer {self.api_key}":
            return 401, {"errors": [{"message": "Unauthorized"}]}, "application/json"
        try:
            query = json.loads(body)["query"]
        except (ValueError, KeyError):
            return 400, {"errors": [{"message": "Bad request"}]}, "application/json"
        self.requests.append({"query": query})
        result = graphql_sync(self._schema, query, root_value=self._root())
        payload: dict = {"data": result.data}
        if result.errors:
            payload["errors"] = [{"message": e.message} for e in result.errors]
        return 200, payload, "application/json"

    def _root(self) -> dict:
        def gpu_types(info, input=None):
            rows = self.gpu_types
            if input and input.get("id"):
                rows = [r for r in rows if r["id"] == input["id"]]
            return rows

        def pod(info, input):
            with self._lock:
                found = self.pods.get(input["podId"])
                return found.as_graphql() if found else None

        def myself(info):
            with self._lock:
                return {
                    "id": "loopback-user",
                    "pubKey": "",
                    "pods": [p.as_graphql() for p in self.pods.values()],
                    "networkVolumes": [
                        {
                            "id": "loopback-volume",
                            "name": "cache",
                            "size": 100,
                            "dataCenterId": "LB-1",
                        }
                    ],
                }

        def deploy_on_demand(info, input=None):
            return self._deploy(input or {}, spot=False, bid=None)

        def rent_interruptable(info, input):
            return self._deploy(input, spot=True, bid=float(input["bidPerGpu"]))

        def stop(info, input):
            with self._lock:
                found = self.pods.get(input["podId"])
                if found is None:
                    raise _QueryError("pod not found")
            self._stop(found)
            return {"id": found.id, "desiredStatus": found.desired_status}

        def resume(info, input):
            with self._lock:
                found = self.pods.get(input["podId"])
                if found is None:
                    raise _QueryError("pod not found")
                if found.desired_status != "RUNNING":
                    found.desired_status = "RUNNING"
                    found.started_at = time.monotonic()
                    self._run(found)
                return found.as_graphql()

        def terminate(info, input):
            with self._lock:
                found = self.pods.pop(input["podId"], None)
                if found is None:
                    raise _QueryError("pod not found")
                self._kill(found)
                self.terminated.append(found.id)
            return None

        return {
            "gpuTypes": gpu_types,
            "pod": pod,
            "myself": myself,
            "podFindAndDeployOnDemand": deploy_on_demand,
            "podRentInterruptable": rent_interruptable,
            "podStop": stop,
            "podResume": resume,
            "podTerminate": terminate,
        }

    # ------------------------------------------------------------------ pods
    def _deploy(self, spec: dict, *, spot: bool, bid: float | None, check_capacity=True) -> dict:
        gpu = next((g for g in self.gpu_types if g["id"] == spec.get("gpuTypeId")), None)
        if gpu is None:
            raise _QueryError(f"There is no GPU type {spec.get('gpuTypeId')!r}.")
        with self._lock:
            if check_capacity:
                pool = self.spot_capacity if spot and gpu["id"] in self.spot_capacity else None
                pool = pool if pool is not None else self.capacity
                left = pool.get(gpu["id"])
                if left is not None and left <= 0:
                    raise _QueryError(NO_CAPACITY)
                if left is not None:
                    pool[gpu["id"]] = left - 1
                if spot and bid is not None and bid < gpu["lowestPrice"]["minimumBidPrice"]:
                    raise _QueryError(
                        f"Your bid of {bid} is below the minimum bid price "
                        f"{gpu['lowestPrice']['minimumBidPrice']}."
                    )
            count = int(spec.get("gpuCount") or 1)
            pod = LoopbackPod(
                id=uuid.uuid4().hex[:14],
                name=spec.get("name") or "",
                image=spec.get("imageName") or "",
                gpu_type_id=gpu["id"],
                gpu_count=count,
                env={e["key"]: e["value"] for e in spec.get("env") or []},
                spot=spot,
                bid_per_gpu=bid,
                cost_per_hour=(bid if spot else gpu["securePrice"]) * count,
                volume_mount_path=spec.get("volumeMountPath") or "/runpod-volume",
                docker_args=spec.get("dockerArgs") or "",
                last_status_change=f"Rented by User: {time.strftime('%c')}",
            )
            self.pods[pod.id] = pod
            self._run(pod)
            return pod.as_graphql()

    def _container_env(self, pod: LoopbackPod) -> dict[str, str]:
        """The image's ENV (gpu/Dockerfile) then the pod's, with the volume mapped locally."""
        mount = pod.volume_mount_path.rstrip("/")
        volume = str(self.volume_dir) if self.volume_dir else mount
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
        env = {k: v for k, v in os.environ.items() if k in keep}
        scratch = (self.log_dir or Path("/tmp")) / f"pod-{pod.id}"
        env |= {
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CRUCIBLE_MODEL_CACHE": f"{volume}/crucible/models",
            "HF_HOME": f"{volume}/huggingface",
            "CRUCIBLE_WORK_DIR": str(scratch),
            "RUNPOD_POD_ID": pod.id,
        }
        for key, value in pod.env.items():
            env[key] = value.replace(mount, volume, 1) if value.startswith(mount) else value
        env |= self.extra_env
        return env

    def _command(self, pod: LoopbackPod) -> list[str]:
        if pod.image in self.image_commands:
            return list(self.image_commands[pod.image])
        if pod.image == "loopback/sleeper":
            return [sys.executable, "-c", "import time; time.sleep(3600)"]
        # The worker image's ENTRYPOINT (gpu/Dockerfile), run from this repository.
        return [sys.executable, "-m", "gpu.train", *pod.docker_args.split()]

    def _run(self, pod: LoopbackPod) -> None:
        log_dir = self.log_dir or Path("/tmp")
        log_dir.mkdir(parents=True, exist_ok=True)
        pod.log_path = log_dir / f"pod-{pod.id}.log"
        log = open(pod.log_path, "ab")  # noqa: SIM115 - handed to the child
        pod.process = subprocess.Popen(
            self._command(pod),
            cwd=REPO,
            env=self._container_env(pod),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        threading.Thread(target=self._watch, args=(pod, pod.process), daemon=True).start()

    def _watch(self, pod: LoopbackPod, process: subprocess.Popen) -> None:
        code = process.wait()
        with self._lock:
            if pod.process is process and pod.desired_status == "RUNNING":
                pod.exit_code = code
                pod.desired_status = "EXITED"
                pod.last_status_change = f"Exited by container: exit code {code}"

    def _stop(self, pod: LoopbackPod) -> None:
        process = pod.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        with self._lock:
            pod.desired_status = "EXITED"
            pod.last_status_change = "Stopped by User"

    def _kill(self, pod: LoopbackPod) -> None:
        process = pod.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log(self, pod_id: str) -> str:
        path = (self.log_dir or Path("/tmp")) / f"pod-{pod_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""


if __name__ == "__main__":  # a loopback RunPod to point a development server at
    with LoopbackRunPod(volume_dir=REPO / "var") as server:
        print(f"RUNPOD_API_BASE_URL={server.url} RUNPOD_API_KEY={server.api_key}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
