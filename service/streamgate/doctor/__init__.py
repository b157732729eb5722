"""streamgate-doctor: point it at any stream and it says whether, and where, it is buffered.

probe.py sends one streaming request and records every socket read (standard library only: it is
also piped to hosts over SSH); verdict.py judges one probe by timing; cli.py runs and renders.
"""
