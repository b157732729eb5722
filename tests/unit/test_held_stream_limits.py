"""The deployed defaults fit 10,000 held streams on one box (support/capacity.py says what each
limit must be and why): nginx/*.j2 rendered with the role's defaults, the units' LimitNOFILE, the
gunicorn config's backlog. bench/held_streams.py measures it (make bench-held).

Negative controls: each limit put back to a value that does not fit (the old defaults among them:
worker_connections 4096, nginx's own listen backlog, gunicorn's own backlog) is reported, read
the same way from an edited template, unit or config, so a reader that finds nothing cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import capacity


def test_the_deployed_defaults_fit_10000_held_streams():
    limits = capacity.deployed_limits()
    assert capacity.shortfalls(limits) == [], limits
    assert capacity.HELD_STREAMS_TARGET == 10_000


def test_every_listen_of_the_site_is_read_in_both_tls_modes():
    assert len(capacity.deployed_limits().nginx_listen_backlogs) == 2  # HTTPS and the redirects
    plain = capacity.nginx_limits(capacity.rendered_nginx({"nginx_tls": False}))
    assert plain["nginx_listen_backlogs"] == (4096,)


@pytest.mark.parametrize(
    ("overrides", "reported"),
    [
        (
            {"nginx_worker_connections": 4096, "nginx_worker_rlimit_nofile": 8192},
            "nginx worker_connections 4096 < 20066",
        ),
        ({"nginx_worker_connections": 20000}, "nginx worker_connections 20000"),
        ({"nginx_worker_rlimit_nofile": 20480}, "nginx worker_rlimit_nofile 20480"),
        ({"nginx_listen_backlog": 511}, "nginx listen backlog [511, 511]"),
        ({"nginx_upstream_keepalive": 1024}, "nginx worker_connections 20480 < 21026"),
    ],
)
def test_negative_control_an_nginx_limit_that_does_not_fit_is_reported(overrides, reported):
    problems = capacity.shortfalls(capacity.deployed_limits(overrides))
    assert [problem for problem in problems if reported in problem], problems


def test_negative_control_a_listen_without_backlog_counts_as_nginx_default():
    rendered = capacity.rendered_nginx()
    site = rendered["streamgate.conf"]
    assert site.count(" backlog=4096;") == 2
    rendered["streamgate.conf"] = site.replace(" backlog=4096;", ";")
    assert capacity.nginx_limits(rendered)["nginx_listen_backlogs"] == (511, 511)


def test_negative_control_gunicorn_without_backlog_has_its_own_2048(tmp_path):
    conf = capacity.GUNICORN_CONF.read_text()
    assert conf.count("\nbacklog = ") == 1
    edited = tmp_path / "gunicorn.conf.py"
    edited.write_text(conf.replace("\nbacklog = ", "\n_old_backlog = "))
    backlog = capacity.gunicorn_backlog(edited)
    assert backlog == 2048
    problems = capacity.shortfalls(capacity.deployed_limits(gateway_backlog=backlog))
    assert problems == ["gunicorn backlog 2048 < 4096"]


@pytest.mark.parametrize(
    ("unit", "field", "nofile", "reported"),
    [
        (capacity.GATEWAY_UNIT, "gateway_nofile", 16384, "gateway LimitNOFILE 16384 < 20128"),
        (capacity.SIMULATOR_UNIT, "simulator_nofile", 8192, "simulator LimitNOFILE 8192 < 10128"),
    ],
)
def test_negative_control_a_unit_with_too_few_open_files_is_reported(
    tmp_path, unit: Path, field, nofile, reported
):
    text = unit.read_text()
    edited = tmp_path / unit.name
    edited.write_text(
        text.replace(f"LimitNOFILE={capacity.unit_nofile(unit)}\n", f"LimitNOFILE={nofile}\n")
    )
    found = capacity.unit_nofile(edited)
    assert found == nofile
    problems = capacity.shortfalls(capacity.deployed_limits(**{field: found}))
    assert [problem.split(" (")[0] for problem in problems] == [reported]


def test_fewer_streams_fit_what_10000_do_not():
    old = capacity.deployed_limits(
        {"nginx_worker_connections": 4096, "nginx_worker_rlimit_nofile": 8192}
    )
    assert capacity.shortfalls(old, streams=2000) == []
    assert capacity.shortfalls(old, streams=2100)
