#!/usr/bin/env python3
"""llama.cpp's own HTTP server (the `xllamacpp` wheel, in this process) on one GGUF model.

    python tools/llm/serve.py --model M.gguf --host 127.0.0.1 --port 8080 [--alias NAME]

An OpenAI-compatible upstream that is not the simulator: `/v1/chat/completions` (streamed as
`chat.completion.chunk` events and `data: [DONE]`), `/health`, `/v1/models`. Runs until SIGTERM or
SIGINT. Prints one line when it serves.
"""

from __future__ import annotations

import argparse
import signal
import threading

import xllamacpp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="GGUF file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--alias", default="test-llama", help="the model name /v1/models reports")
    parser.add_argument("--parallel", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--ctx", type=int, default=8192, help="context, shared by the sequences")
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="answer length when a request sets none"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads decoding")
    # One thread per open connection: requests beyond --parallel wait in the server's queue
    # instead of in the listen backlog (where a gateway's connect would time out).
    parser.add_argument("--http-threads", type=int, default=512)
    args = parser.parse_args()

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}  # a set of names in this binding
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx
    params.n_predict = args.max_tokens
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_threads_http = args.http_threads
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = xllamacpp.Server(params)
    print(
        f"llama.cpp server on {server.listening_address}, {args.model} as {args.alias}", flush=True
    )
    stop.wait()


if __name__ == "__main__":
    main()
