"""Companion commands of cli.py (see cli.COMMANDS)."""
