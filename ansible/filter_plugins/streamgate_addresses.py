"""Where a host's service listens and who may reach it: one rule for the gateway (its clients:
the edge hosts), the simulator and llama.cpp's server (their clients: the app hosts).

    clients | streamgate_served_address(inventory_hostname, streamgate_private_address)
    clients | streamgate_client_addresses(inventory_hostname, hostvars)

where clients is the client group's hosts (groups['app'] | default([])).

tests/infra/helpers.py states the same rule independently, for the checks of deployed hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

LOOPBACK = "127.0.0.1"


def private_address(host: str, hostvars: Mapping) -> str:
    """A host's address on the network the stack's hosts share: its streamgate_private_address,
    else its ansible_host, else its inventory name (the roles' defaults are not in hostvars)."""
    variables = hostvars[host]
    for name in ("streamgate_private_address", "ansible_host"):
        if name in variables:
            return variables[name]
    return host


def served_address(clients: Sequence[str], host: str, own_private_address: str) -> str:
    """Where `host`'s service listens and its clients reach it: loopback when every client
    host is `host` itself, else its private address."""
    return LOOPBACK if list(clients) == [host] else own_private_address


def client_addresses(clients: Sequence[str], host: str, hostvars: Mapping) -> list[str]:
    """Where the clients connect from, for the firewall: the private address of each client
    host other than `host` (its own connections arrive on loopback, always allowed)."""
    return [private_address(client, hostvars) for client in clients if client != host]


class FilterModule:
    def filters(self) -> dict:
        return {
            "streamgate_served_address": served_address,
            "streamgate_client_addresses": client_addresses,
        }
