"""Test support shared by the wire, load and lab tests (processes, nginx, stream probe)."""
