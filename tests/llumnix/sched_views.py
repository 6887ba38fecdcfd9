"""Builders of hand-made cluster views for the scheduler tests."""

from __future__ import annotations

from llumnix.scheduler import ClusterView, InstanceInfo, InstanceStatus


def make_status(iid: str, **kw: object) -> InstanceStatus:
    """A report of a 100-block instance; keyword arguments override fields."""
    kw.setdefault("num_total_blocks", 100)
    kw.setdefault("num_free_blocks", kw["num_total_blocks"])
    return InstanceStatus(instance_id=iid, **kw)  # type: ignore[arg-type]


def make_view(*statuses: InstanceStatus, domains: dict[str, str] | None = None) -> ClusterView:
    view = ClusterView()
    for s in statuses:
        domain = (domains or {}).get(s.instance_id, "")
        view.add_instance(InstanceInfo(s.instance_id, s.num_total_blocks, 16, domain), s)
    return view
