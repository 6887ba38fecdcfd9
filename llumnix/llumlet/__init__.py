"""The llumlet: one agent per engine instance, running inside the engine. It follows the
engine's scheduler step by step (:class:`StatusTracker`, fed by an engine adapter such as
``llumnix.llumlet.vllm.LlumletConnector``), pushes a status report after its steps (ZMQ PUB;
:class:`ReportSubscriber` reads them) and serves status, health and drain over gRPC
(:class:`Llumlet`, ``llumlet.proto``; :class:`LlumletClient` calls it)."""

from llumnix.llumlet.server import Llumlet, LlumletClient, LlumletConfig, ReportSubscriber
from llumnix.llumlet.status import Scheduled, StatusTracker, to_instance_status

__all__ = [
    "Llumlet",
    "LlumletClient",
    "LlumletConfig",
    "ReportSubscriber",
    "Scheduled",
    "StatusTracker",
    "to_instance_status",
]
