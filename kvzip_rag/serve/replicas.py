"""``kvzip-rag serve --ray --replicas N``: the server's FastAPI app (:func:`.app.create_app`) as a Ray Serve
deployment (its FastAPI ingress) with N replicas behind Ray Serve's HTTP proxy (``pip install 'kvzip-rag[ray]'``).

Each replica is a Ray actor that loads the model once and opens the one shared store: an SQLAlchemy URL every
replica reaches (PostgreSQL) with blobs in object storage, or, on one machine, a store folder (its SQLite file
runs in WAL mode with a busy timeout and ``BEGIN IMMEDIATE`` writes, so several replica processes may add and
delete documents at once). Every response names the replica that answered in :data:`REPLICA_HEADER`. A replica
that dies fails its requests in flight (a 5xx, or a stream cut short), Ray Serve routes later requests to the
replicas alive and starts a replacement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvzip_rag.errors import ClusterError, InvalidArgumentError
from kvzip_rag.extras import require

APP_NAME = "kvzip-rag"
REPLICA_HEADER = "x-kvzip-replica"


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica opens: ``store`` (``CacheStore`` arguments: ``url`` or ``path``, blobs), ``model`` (an
    alias or folder for :func:`kvzip_rag.load_model`), the service's ``ratio``/``level``/``batching``, the
    server's ``timeout``, the torch ``threads`` of each replica (its CPUs on the cluster) and its ``matmul`` precision."""

    store: dict
    model: str | None = None
    ratio: float | None = None
    level: str | None = None
    batching: bool = False
    timeout: float | None = None
    threads: int = 1
    matmul: str | None = None  # kvzip_rag.matmul: None = KVZIP_RAG_MATMUL on the replica, else float32


class ReplicaHeader:
    """ASGI middleware: every HTTP response carries the replica's id (a pure ASGI wrapper, so streams and
    disconnects pass through unchanged)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


class Replica:
    """One replica's state: the model (loaded once) and a QA service over the shared store; Ray Serve asks it
    for the ASGI app after construction (``__serve_build_asgi_app__``)."""

    def __init__(self, settings: ReplicaSettings) -> None:
        from ray import serve

        from kvzip_rag.models import load_model
        from kvzip_rag.qa import QAService
        from kvzip_rag.store import CacheStore

        model = load_model(settings.model, threads=settings.threads, matmul=settings.matmul)
        self.service = QAService(CacheStore(**settings.store), model, ratio=settings.ratio, level=settings.level,
                                 batching=settings.batching)
        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        app = create_app(self.service, timeout=self.settings.timeout)
        app.add_middleware(ReplicaHeader, replica=self.replica_id)
        return app


def _require_serve():
    require("ray", "ray", "kvzip-rag serve --ray")
    try:
        from ray import serve
    except ImportError as error:  # ray without its [serve] extra (grpc, aiohttp...)
        raise ClusterError(f"Ray Serve cannot be imported ({error}); pip install 'ray[serve]' (the version of "
                           "your ray)") from None
    return serve


def deploy(settings: ReplicaSettings, replicas: int, host: str, port: int, address: str | None = None,
           ray_init: dict | None = None) -> str:
    """Start (or join) the Ray cluster, Ray Serve's HTTP proxy on ``host:port`` and ``replicas`` replicas; returns
    the base URL once every replica has its model loaded. :func:`shutdown` stops them."""
    from kvzip_rag.scheduler import DEFAULT_MAX_QUEUE
    from kvzip_rag.store.distributed import init_ray

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidArgumentError(f"replicas must be a positive integer, got {replicas!r}")
    serve = _require_serve()
    import ray

    started = not ray.is_initialized()  # a cluster this call starts is stopped again if the deployment fails
    if started:
        init_ray(address, **(ray_init or {}))
    threads = str(settings.threads)
    env = {"OMP_NUM_THREADS": threads, "KVZIP_RAG_THREADS": threads}
    deployment = serve.deployment(serve.ingress()(Replica)).options(
        name="Replica", num_replicas=replicas, max_ongoing_requests=DEFAULT_MAX_QUEUE,
        ray_actor_options={"num_cpus": settings.threads, "runtime_env": {"env_vars": env}})
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if replicas * settings.threads > cpus:  # Ray Serve would wait for them forever
            raise InvalidArgumentError(f"{replicas} replicas of {settings.threads} thread(s) need "
                                       f"{replicas * settings.threads} CPUs; the Ray cluster has {cpus}")
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment.bind(settings), name=APP_NAME, route_prefix="/")
    except Exception as error:  # Ray Serve raises RuntimeError, DeploymentFailed, RayActorError...
        if started:
            shutdown()
        if isinstance(error, InvalidArgumentError):
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ClusterError(f"Ray Serve could not start {replicas} replica(s): {type(error).__name__}: "
                           f"{first_line}") from error
    return f"http://{host}:{port}"


def replica_actors() -> dict[str, Any]:
    """The running replicas' Ray actors by replica id (the :data:`REPLICA_HEADER` value), e.g. to kill one."""
    import ray
    from ray.util import list_named_actors

    prefix = f"SERVE_REPLICA::{APP_NAME}#Replica#"
    return {a["name"][len(prefix):]: ray.get_actor(a["name"], namespace="serve")
            for a in list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def shutdown() -> None:
    """Stop Ray Serve's replicas and proxy, and disconnect from the cluster (a local one stops)."""
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()
