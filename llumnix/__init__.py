"""Llumnix control plane: scheduler, rescheduler, llumlet, meta store, gateway, simulator."""

__version__ = "0.1.0"
