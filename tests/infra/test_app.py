"""The gateway on every app host: account, files, unit, hardening, readiness."""

from __future__ import annotations

import re

import pytest

from infra.helpers import check_output_as_root, parse_systemd_timespan

testinfra_hosts = ["ansible://app"]

GATEWAY_PORT = 8000
MAX_EXPOSURE = 2.0
EXPOSURE_LINE = re.compile(r"Overall exposure level for streamgate\.service:\s*([0-9.]+)")


def test_service_user_has_no_login_shell(host):
    user = host.user("streamgate")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")


def test_python_venv_package_is_installed(host):
    assert host.package("python3-venv").is_installed


def test_gateway_and_simulator_scripts_are_in_the_venv(host):
    for script in ("gunicorn", "streamgate-sim"):
        executable = host.file(f"/opt/streamgate/venv/bin/{script}")
        assert executable.is_file and executable.mode & 0o111


def test_venv_is_not_writable_by_the_service(host):
    venv = host.file("/opt/streamgate/venv")
    assert venv.user == "root" and not venv.mode & 0o022


@pytest.mark.parametrize(
    ("path", "user", "group", "mode"),
    [
        ("/etc/streamgate", "root", "streamgate", 0o750),
        ("/etc/streamgate/streamgate.env", "streamgate", "streamgate", 0o600),
        ("/etc/streamgate/gunicorn.conf.py", "root", "streamgate", 0o640),
        ("/etc/systemd/system/streamgate.service", "root", "root", 0o644),
    ],
)
def test_file_owner_and_mode(host, path, user, group, mode):
    with host.sudo():
        managed = host.file(path)
        assert managed.exists, path
        assert (managed.user, managed.group, managed.mode) == (user, group, mode)


def test_env_file_points_the_app_at_an_upstream(host):
    env = check_output_as_root(host, "cat /etc/streamgate/streamgate.env")
    assert re.search(r'^STREAMGATE_UPSTREAM_BASE_URL="https?://\S+"$', env, re.MULTILINE), env
    assert f'STREAMGATE_BIND="0.0.0.0:{GATEWAY_PORT}"' in env


def test_gateway_is_running_and_enabled(host):
    service = host.service("streamgate")
    assert service.is_running
    assert service.is_enabled


def test_gateway_listens_on_its_port(host):
    assert host.socket(f"tcp://0.0.0.0:{GATEWAY_PORT}").is_listening


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
        ("NotifyAccess", "main"),
    ],
)
def test_unit_property(host, unit_property, expected):
    value = host.check_output(f"systemctl show -p {unit_property} --value streamgate")
    assert value == expected


def test_stop_timeout_outlasts_the_graceful_timeout(host):
    env = check_output_as_root(host, "cat /etc/streamgate/streamgate.env")
    graceful_s = float(re.search(r'^STREAMGATE_GRACEFUL_TIMEOUT_S="([0-9.]+)"$', env, re.MULTILINE)[1])
    stop_s = parse_systemd_timespan(
        host.check_output("systemctl show -p TimeoutStopUSec --value streamgate")
    )
    assert stop_s > graceful_s


def test_reload_is_a_hup_to_the_master(host):
    exec_reload = host.check_output("systemctl show -p ExecReload --value streamgate")
    assert "/bin/kill" in exec_reload and "-s HUP $MAINPID" in exec_reload


def test_unit_reads_the_env_file_through_the_app(host):
    environment = host.check_output("systemctl show -p Environment --value streamgate")
    assert "STREAMGATE_ENV_FILE=/etc/streamgate/streamgate.env" in environment
    assert host.check_output("systemctl show -p EnvironmentFiles --value streamgate") == ""


def test_systemd_security_exposure_is_at_most_two(host):
    report = check_output_as_root(host, "systemd-analyze security --no-pager streamgate.service")
    match = EXPOSURE_LINE.search(report)
    assert match, report[-500:]
    assert float(match[1]) <= MAX_EXPOSURE, report


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_gateway_answers_health_checks_on_the_host(host, path):
    status = host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 http://127.0.0.1:{GATEWAY_PORT}{path}"
    )
    assert status == "200"


@pytest.mark.parametrize(
    ("text", "seconds"), [("10min 45s", 645.0), ("645000000", 645.0), ("1min 30s", 90.0)]
)
def test_timespan_parser(text, seconds):
    assert parse_systemd_timespan(text) == seconds


def test_reload_keeps_the_master_and_stays_ready(host):
    """`systemctl reload` (HUP) replaces the workers under the same master, still ready after."""
    main_pid_before = host.check_output("systemctl show -p MainPID --value streamgate")
    check_output_as_root(host, "systemctl reload streamgate")
    # Bounded: 20 tries, 1 s apart; curl fails fast when nothing answers.
    status = host.check_output(
        "for try in $(seq 20); do "
        f"code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 2 http://127.0.0.1:{GATEWAY_PORT}/readyz); "
        '[ "$code" = 200 ] && break; sleep 1; done; echo "$code"'
    )
    assert status == "200"
    assert host.check_output("systemctl show -p MainPID --value streamgate") == main_pid_before
    assert host.service("streamgate").is_running
