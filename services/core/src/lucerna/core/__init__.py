"""Lucerna core: what every service shares (settings, logging, metrics, messaging, storage ports)."""
