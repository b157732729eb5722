"""llama.cpp's own HTTP server (the `xllamacpp` wheel, in this process) on one GGUF model.

    streamgate-llm-server --model M.gguf --host 127.0.0.1 --port 8080 [--alias NAME]

What the `llm` role runs when it installs the server from the wheel (`streamgate[llm]`); the
options are named as `llama-server`'s (Debian's llama.cpp-tools), so the role's unit passes the
same ones to either. Serves `/v1/chat/completions` (streamed as `chat.completion.chunk` events
and `data: [DONE]`), `/health` and `/v1/models` until SIGTERM or SIGINT; prints one line when it
serves.
"""

from __future__ import annotations

import argparse
import signal
import threading


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="streamgate-llm-server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-m", "--model", required=True, help="GGUF file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "-a", "--alias", default="test-llama", help="the model name /v1/models reports"
    )
    parser.add_argument(
        "-np", "--parallel", type=int, default=32, help="sequences decoded together"
    )
    parser.add_argument(
        "-c", "--ctx-size", type=int, default=8192, help="context, shared by the sequences"
    )
    parser.add_argument(
        "-n", "--n-predict", type=int, default=512, help="answer length when a request sets none"
    )
    parser.add_argument("-t", "--threads", type=int, default=1, help="CPU threads decoding")
    # One thread per open connection: requests beyond --parallel wait in the server's queue
    # instead of in the listen backlog (where a gateway's connect would time out).
    parser.add_argument("--threads-http", type=int, default=512)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import xllamacpp  # the `llm` extra: not installed with the gateway

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}  # a set of names in this binding
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx_size
    params.n_predict = args.n_predict
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_threads_http = args.threads_http
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
