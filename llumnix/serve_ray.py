"""``llumnix serve --ray [ADDRESS]``: the engines placed on an existing Ray cluster.

Each instance gets a placement group of one bundle (``--ray-cpus`` CPUs, ``--ray-gpus``
GPUs, ``STRICT_PACK``) and an actor scheduled into it; the actor starts the same vLLM server
with its llumlet as the local path does (:func:`llumnix.serve.launch_engine`), on its node's
IP address, with this process's vLLM/OpenMP settings, and ends its process tree when asked.
The gateway, meta store and registrations stay in this process: the instances are reached
over the network at the addresses the actors report. On exit every engine is stopped, its
actor killed and its placement group removed; the cluster itself is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any

from llumnix.launch import engine_env, instance_ids, launch_engine

ACTOR_CALL_TIMEOUT_S = 30.0


class _EngineActor:
    """Runs on a Ray worker: one engine process and its llumlet."""

    def __init__(
        self, args: argparse.Namespace, iid: str, role: str, logs: str, env: dict[str, str]
    ) -> None:
        import ray

        host = ray.util.get_node_ip_address()
        Path(logs).mkdir(parents=True, exist_ok=True)
        self.engine = launch_engine(args, iid, role, host, Path(logs), env)

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"url": e.url, "llumlet": e.llumlet, "reports": e.reports, "pid": e.pid,
                "log": str(e.log)}  # fmt: skip

    def alive(self) -> bool:
        return self.engine.alive()

    def healthy(self) -> bool:
        return self.engine.healthy()

    def log_tail(self, n: int = 30) -> str:
        return self.engine.log_tail(n)

    def stop(self) -> None:
        self.engine.stop()


class RayEngine:
    """The gateway side of an engine on Ray: what :class:`EngineProcess` offers, by calls to
    its actor."""

    def __init__(self, instance_id: str, actor: Any, group: Any) -> None:
        import ray

        self.instance_id = instance_id
        self.actor, self.group = actor, group
        info = ray.get(actor.info.remote(), timeout=ACTOR_CALL_TIMEOUT_S)
        self.url, self.llumlet, self.reports = info["url"], info["llumlet"], info["reports"]
        self.pid, self.log = info["pid"], Path(info["log"])

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self.actor, method).remote(*args), timeout=ACTOR_CALL_TIMEOUT_S)

    def alive(self) -> bool:
        try:
            return bool(self._call("alive"))
        except Exception:  # the actor or its node is gone
            return False

    def healthy(self) -> bool:
        try:
            return bool(self._call("healthy"))
        except Exception:
            return False

    def log_tail(self, n: int = 30) -> str:
        try:
            return str(self._call("log_tail", n))
        except Exception as exc:
            return f"(no log: {type(exc).__name__}: {exc})"

    def stop(self, timeout: float = 15.0) -> None:
        import ray

        with contextlib.suppress(Exception):
            self._call("stop")
        with contextlib.suppress(Exception):
            ray.kill(self.actor)
        remove_placement_group_quietly(self.group)


def start_ray_engines(args: argparse.Namespace, logs: Path) -> list[RayEngine]:
    """Connects to the Ray cluster at ``args.ray`` and starts every instance there."""
    try:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError as exc:
        raise RuntimeError("--ray needs ray (pip install 'llumnix[ray]')") from exc
    ray.init(address=args.ray, logging_level=logging.WARNING, log_to_driver=False)
    bundle = {"CPU": args.ray_cpus, **({"GPU": args.ray_gpus} if args.ray_gpus else {})}
    actor_cls = ray.remote(_EngineActor)
    env = engine_env(args)
    engines: list[RayEngine] = []
    try:
        for iid, role in instance_ids(args):
            group = placement_group([bundle], strategy="STRICT_PACK", name=f"llumnix-{iid}")
            try:
                ray.get(group.ready(), timeout=args.start_timeout)
            except Exception as exc:
                remove_placement_group_quietly(group)
                raise RuntimeError(
                    f"Ray could not place {iid} ({bundle}): {type(exc).__name__}: {exc}"
                ) from exc
            actor = actor_cls.options(
                num_cpus=args.ray_cpus,
                num_gpus=args.ray_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group),
                name=f"llumnix-{iid}-{id(group):x}",
            ).remote(args, iid, role, str(logs), env)
            engines.append(RayEngine(iid, actor, group))
    except BaseException:
        for e in engines:
            e.stop()
        raise
    return engines


def remove_placement_group_quietly(group: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    with contextlib.suppress(Exception):
        remove_placement_group(group)


def disconnect() -> None:
    """Leaves the Ray cluster (it keeps running)."""
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()
