"""Orchestration: VM drivers, accelerator probing, health checks."""
