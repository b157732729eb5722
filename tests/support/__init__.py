"""Test support shared by the unit, wire, load and lab tests, and by bench/ and loadtest/: the one
SSE parser (sse.py), the one chunked decoder (stream_probe.py) and the one process harness
(procs.py), all stdlib only; the processes under test (services.py, nginx.py)."""
