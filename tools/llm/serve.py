#!/usr/bin/env python3
"""Moved into the wheel: `streamgate-llm-server` (service/streamgate/llm_server.py)."""

from streamgate.llm_server import main

if __name__ == "__main__":
    main()
