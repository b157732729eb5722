"""The gateway on every app host: account, files, unit, hardening, readiness. What every server of
the kit shares (running, bound where the edge reaches it, healthy, firewall, bounds, sandbox) is
checked in test_services.py."""

from __future__ import annotations

import re

import pytest
from support.ci import skip_unless_ci
from support.upstream import setting

from infra.helpers import check_output_as_root, parse_systemd_timespan

testinfra_hosts = ["ansible://app"]

# Where the roles put the app's files, read as the inventory sets or the roles define them.
PATH_VARIABLES = {
    "config_dir": "streamgate_config_dir",
    "env_file": "streamgate_env_file",
    "proxy_env_file": "__streamgate_proxy_env_file",
    "unit_file": "__streamgate_unit_file",
    "venv_dir": "streamgate_venv_dir",
    "firewall_dir": "__host_firewall_dir",
}


@pytest.fixture(scope="module")
def paths(hostvars) -> dict[str, str]:
    return {key: setting(hostvars, name) for key, name in PATH_VARIABLES.items()}


def test_service_user_has_no_login_shell(host):
    user = host.user("streamgate")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")


def test_python_venv_package_is_installed(host):
    assert host.package("python3-venv").is_installed


def test_gateway_and_simulator_scripts_are_in_the_venv(host, paths):
    for script in ("gunicorn", "streamgate-sim"):
        executable = host.file(f"{paths['venv_dir']}/bin/{script}")
        assert executable.is_file and executable.mode & 0o111


def test_venv_is_not_writable_by_the_service(host, paths):
    venv = host.file(paths["venv_dir"])
    assert venv.user == "root" and not venv.mode & 0o022


@pytest.mark.parametrize(
    ("where", "user", "group", "mode"),
    [
        ("config_dir", "root", "streamgate", 0o750),
        ("env_file", "streamgate", "streamgate", 0o600),
        ("unit_file", "root", "root", 0o644),
        ("proxy_env_file", "root", "root", 0o600),
        ("firewall_dir", "root", "root", 0o700),
        ("firewall_dir/gateway.nft", "root", "root", 0o600),
    ],
)
def test_file_owner_and_mode(host, paths, where, user, group, mode):
    key, _, name = where.partition("/")
    path = f"{paths[key]}/{name}" if name else paths[key]
    with host.sudo():
        managed = host.file(path)
        assert managed.exists, path
        assert (managed.user, managed.group, managed.mode) == (user, group, mode)


def test_env_file_points_the_app_at_an_upstream(host, paths, bind_address, gateway_port):
    env = check_output_as_root(host, f"cat {paths['env_file']}")
    assert re.search(r'^STREAMGATE_UPSTREAM_BASE_URL="https?://\S+"$', env, re.MULTILINE), env
    assert f'STREAMGATE_BIND="{bind_address}:{gateway_port}"' in env


def test_gateway_runs_as_the_service_user(host):
    main_pid = host.check_output("systemctl show -p MainPID --value streamgate")
    assert int(main_pid) > 0
    owner = host.check_output(f"ps -o user= -p {main_pid}")
    assert owner.strip() == "streamgate"


@pytest.mark.parametrize(
    ("unit_property", "expected"),
    [
        ("Type", "notify"),
        ("KillMode", "mixed"),
        ("Restart", "on-failure"),
        ("NotifyAccess", "all"),  # the upgrade's new master is named MAINPID by its workers
    ],
)
def test_unit_property(host, unit_property, expected):
    value = host.check_output(f"systemctl show -p {unit_property} --value streamgate")
    assert value == expected


def test_stop_timeout_outlasts_the_graceful_timeout(host, paths):
    env = check_output_as_root(host, f"cat {paths['env_file']}")
    graceful_s = float(
        re.search(r'^STREAMGATE_GRACEFUL_TIMEOUT_S="([0-9.]+)"$', env, re.MULTILINE)[1]
    )
    stop_s = parse_systemd_timespan(
        host.check_output("systemctl show -p TimeoutStopUSec --value streamgate")
    )
    assert stop_s > graceful_s


def test_reload_is_a_hup_to_the_master(host):
    exec_reload = host.check_output("systemctl show -p ExecReload --value streamgate")
    assert "/bin/kill" in exec_reload and "-s HUP $MAINPID" in exec_reload


def test_gunicorn_runs_the_config_in_the_wheel(host, paths):
    """The master's command line names the packaged config; no copy of it waits in /etc."""
    main_pid = host.check_output("systemctl show -p MainPID --value streamgate")
    argv = check_output_as_root(host, f"cat /proc/{main_pid}/cmdline | tr '\\0' ' '")
    assert "--config python:streamgate.gunicorn_conf " in argv, argv
    with host.sudo():
        assert not host.file(f"{paths['config_dir']}/gunicorn.conf.py").exists


def test_unit_reads_the_env_file_through_the_app(host, paths):
    environment = host.check_output("systemctl show -p Environment --value streamgate")
    assert f"STREAMGATE_ENV_FILE={paths['env_file']}" in environment
    assert "PROXY" not in environment.upper(), environment
    env_files = host.check_output("systemctl show -p EnvironmentFiles --value streamgate")
    assert env_files.split() == [paths["proxy_env_file"], "(ignore_errors=no)"], env_files


def test_proxy_variables_reach_the_process_intact(host, hostvars, paths):
    """What the inventory sets arrives byte for byte (a `%` or `$` used to break the unit)."""
    wanted = hostvars.get("streamgate_proxy_env") or {}
    if not wanted:
        skip_unless_ci("the inventory sets no streamgate_proxy_env")
    main_pid = host.check_output("systemctl show -p MainPID --value streamgate")
    environ = check_output_as_root(host, f"cat /proc/{main_pid}/environ | tr '\\0' '\\n'")
    seen = dict(line.split("=", 1) for line in environ.splitlines() if "=" in line)
    for name, value in wanted.items():
        assert seen.get(name) == str(value), name
    unit_text = host.file(paths["unit_file"]).content_string
    assert not any(str(value) in unit_text for value in wanted.values())


@pytest.mark.parametrize(
    ("text", "seconds"), [("10min 45s", 645.0), ("645000000", 645.0), ("1min 30s", 90.0)]
)
def test_timespan_parser(text, seconds):
    assert parse_systemd_timespan(text) == seconds


def test_reload_keeps_the_master_and_stays_ready(host, bind_address, gateway_port):
    """`systemctl reload` (HUP) replaces the workers under the same master, still ready after."""
    main_pid_before = host.check_output("systemctl show -p MainPID --value streamgate")
    check_output_as_root(host, "systemctl reload streamgate")
    # Bounded: 20 tries, 1 s apart; curl fails fast when nothing answers.
    status = host.check_output(
        "for try in $(seq 20); do "
        "code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "
        f"http://{bind_address}:{gateway_port}/readyz); "
        '[ "$code" = 200 ] && break; sleep 1; done; echo "$code"'
    )
    assert status == "200"
    assert host.check_output("systemctl show -p MainPID --value streamgate") == main_pid_before
    assert host.service("streamgate").is_running
