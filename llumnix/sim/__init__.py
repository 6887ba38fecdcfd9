"""Discrete-event cluster simulator driving the production scheduler and rescheduler."""
