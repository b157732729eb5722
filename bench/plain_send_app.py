"""The gateway with its callback send off: every chunk goes through the relay's task, which
awaits the server's `send` as any ASGI app would (routes/relay.py, path 2 only).

The benchmark's `gateway-plain` and `nginx-plain` targets run it next to the product
(`gateway`, `nginx`) to measure what the callback path (routes/eager_send.py) saves.
"""

from streamgate.app import create_app as _create_product_app
from streamgate.routes.relay import Relay


def create_app():
    Relay.relays_from_callback = False
    return _create_product_app()
