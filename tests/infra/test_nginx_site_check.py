"""A site that nginx refuses never replaces the live one (the site is checked inside a whole
candidate config before it is swapped in), so nginx keeps serving and its next restart works.

Runs the nginx role on the edge with a site made invalid on purpose (its access log in a
directory that does not exist: `nginx -t` fails to open it) and checks that the run fails on
the check, the live site is unchanged and `nginx -t` of the live config still passes.
Negative control (done by hand once): without the check the broken site lands in conf.d/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infra.helpers import check_output_as_root

testinfra_hosts = ["ansible://edge"]

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
PLAYBOOK = Path(__file__).resolve().parent / "playbooks" / "nginx_role.yml"
SITE = "/etc/nginx/conf.d/streamgate.conf"


def test_a_site_nginx_refuses_never_replaces_the_live_one(host, request):
    before = check_output_as_root(host, f"sha256sum {SITE}")
    inventory = request.config.option.ansible_inventory
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            inventory,
            str(PLAYBOOK),
            "--limit",
            host.ansible.get_variables()["inventory_hostname"],
            "-e",
            "__nginx_access_log=/nonexistent-streamgate-dir/access.log",
        ],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={
            **os.environ,
            "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
            "ANSIBLE_NOCOLOR": "1",
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "failed to validate" in output, output[-3000:]
    assert check_output_as_root(host, f"sha256sum {SITE}") == before
    assert "nonexistent-streamgate-dir" not in check_output_as_root(host, f"cat {SITE}")
    check_output_as_root(host, "nginx -t -q")
