"""Ray start/connect and the placement of the three groups (DESIGN.md §1): the student group (Ray Train
workers, one per GPU), the teacher group (`teacher.replicas` TeacherServer actors in their own placement
group) and the data workers (their own placement group). The only module that decides where things run.

- `connect(cfg)`: `ray.init(address="local")` starts an in-process Ray (the embedded default); any other
  `cluster.address` (or `--address`) joins a running cluster. Reuses a Ray that is already up.
- `start_teacher_group(cfg)`: placement group + TeacherServer actors; `None` in shared placement.
- `data_placement(cfg)`: a placement group for the data workers, as actor options for `DataWorkerPool`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from trainer.config import Config


def connect(cfg: Config, address: Optional[str] = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or cfg.cluster.address
    if address == "local":
        # No dashboard (1.5 GB, a server we do not need): Ray Train's placement-group cleaner then cannot reach
        # the state API and warns every second; the hook quiets that one logger in every worker.
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                                  "runtime_env": {"worker_process_setup_hook": quiet_state_api_warnings}}
        if cfg.cluster.num_cpus:
            kwargs["num_cpus"] = cfg.cluster.num_cpus
        # the embedded Ray's banner and its token-auth notice are not the run's business (issue 21: a run that
        # cannot start says so in one line)
        import logging

        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", **kwargs)  # "local": never attach to a stale /tmp/ray cluster by accident
    else:
        ray.init(address=address)


def quiet_state_api_warnings() -> None:
    """Worker setup hook of the embedded Ray (see `connect`)."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    b = {}
    if cpus > 0:
        b["CPU"] = cpus
    if gpus > 0:
        b["GPU"] = gpus
    return b


@dataclass
class TeacherGroup:
    servers: list  # TeacherServer actor handles
    placement_group: Any = None
    extra: dict = field(default_factory=dict)

    def stats(self) -> list[dict]:
        import ray

        return ray.get([s.stats.remote() for s in self.servers])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for s in self.servers:
            ray.kill(s)
        self.servers = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def start_teacher_group(cfg: Config) -> Optional[TeacherGroup]:
    """The TeacherServer replicas on their own resources; None for `teacher.placement: shared`."""
    if cfg.teacher.placement == "shared":
        return None
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.teacher_server import TeacherServer

    t = cfg.teacher
    bundle = _bundle(t.cpus_per_replica, t.gpus_per_replica)
    if t.custom_resource:  # issue 7: replicas only on the nodes that advertise it
        bundle[t.custom_resource] = 1.0
    pg = None
    if bundle:  # a zero-resource replica (CPU tests) needs no reservation
        pg = placement_group([bundle] * t.replicas, strategy="PACK" if t.gpus_per_replica < 1 else "SPREAD")
        ray.get(pg.ready())
    actor = ray.remote(TeacherServer)
    servers = []
    for i in range(t.replicas):
        opts: dict[str, Any] = {"num_cpus": t.cpus_per_replica, "num_gpus": t.gpus_per_replica,
                                "max_concurrency": 64,
                                # issue 7: a dead replica is restarted (reloads the teacher); clients resend
                                "max_restarts": t.max_restarts}
        if t.custom_resource:
            opts["resources"] = {t.custom_resource: 1.0}
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        servers.append(actor.options(**opts).remote(cfg.to_dict(), t.max_batch, t.batch_wait_ms))
    ray.get([s.ping.remote() for s in servers])  # fail here, with the actor's error, if the teacher cannot load
    return TeacherGroup(servers, pg)


def data_placement(cfg: Config) -> dict[str, Any]:
    """Actor options placing the data workers in their own placement group (pass to DataWorkerPool)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpus = cfg.cluster.data_cpus_per_worker
    pin = {"resources": {cfg.cluster.data_custom_resource: 0.01}} if cfg.cluster.data_custom_resource else {}
    if cpus <= 0:  # zero-CPU readers stay with the driver, or where data_custom_resource pins them (issue 11)
        if pin:
            return {"num_cpus": 0, **pin}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)}
    bundle = {"CPU": cpus, **pin.get("resources", {})}
    pg = placement_group([bundle] * cfg.data.workers, strategy="SPREAD")
    ray.get(pg.ready())
    return {"num_cpus": cpus, **pin, "scheduling_strategy": PlacementGroupSchedulingStrategy(pg)}
