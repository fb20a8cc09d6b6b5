"""wpk-serve refuses bad flag values at parse time, and a metrics port it cannot bind is one
line, not a traceback."""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from wpk import cli_args


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wpk.runtime.server", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "argument --port: 70000 is not a port number (0-65535)"),
    (["--port", "-1"], "argument --port: -1 is not a port number"),
    (["--link-port", "65536"], "argument --link-port: 65536 is not a port number"),
    (["--metrics-port", "-3"], "argument --metrics-port: -3 is not a port number"),
    (["--next", ":18602"], "argument --next: ':18602' is not HOST:PORT"),
    (["--next", "edge:99999"], "99999 is not a port number (1-65535)"),
    (["--hop-timeout", "0"], "argument --hop-timeout: 0 must be more than 0"),
    (["--hop-timeout", "inf"], "'inf' is not a finite number"),
    (["--tls-dir", ".", "--link", "tcp"], "--link tcp with --tls-dir"),
    (["--max-message-mb", "3000"], "3000 is not from 1 to 2047 (gRPC's limit is 2 GiB)"),
    (["--max-message-mb", "0"], "0 is not from 1 to 2047"),
])
def test_bad_flag_values_are_refused(plans, flags, message):
    result = serve(str(plans["mlp"]), "--tier", "cloud", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_one_line(plans):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(str(plans["mlp"]), "--tier", "cloud", "--port", "0",
                       "--metrics-port", str(port))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"wpk: error: tier 'cloud': cannot serve metrics on "
                                    f"127.0.0.1:{port}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("kind, text, value", [
    (cli_args.port, "0", 0), (cli_args.port, "65535", 65535), (cli_args.positive_int, "1", 1),
    (cli_args.non_negative_int, "0", 0), (cli_args.positive_float, "0.001", 0.001),
    (cli_args.non_negative_float, "0", 0.0), (cli_args.host_port, "[::1]:8001", "[::1]:8001"),
    (cli_args.host_port, "edge.local:1", "edge.local:1"),
])
def test_good_values_pass(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize("kind, text", [
    (cli_args.port, "65536"), (cli_args.positive_int, "0"), (cli_args.non_negative_int, "-1"),
    (cli_args.positive_float, "nan"), (cli_args.non_negative_float, "-0.5"),
    (cli_args.host_port, "edge"), (cli_args.host_port, "edge:0"), (cli_args.host_port, "[]:1"),
])
def test_bad_values_fail(kind, text):
    with pytest.raises(argparse.ArgumentTypeError):
        kind(text)


def test_next_on_a_tier_that_forwards_nothing_is_a_warning(plans):
    """The last tier with --next: started (a deployment script may always pass it), but told."""
    from wpk.plan import load_plan
    from wpk.runtime.tier_core import TierCore

    with pytest.warns(UserWarning, match="tier 'cloud' forwards nothing to a next tier"):
        service = TierCore(load_plan(plans["mlp"]), plans["mlp"], "cloud", "127.0.0.1:9")
    assert service.next_address is None
    service.executor.shutdown()


def test_the_flags_are_read_once_into_a_serve_config(plans):
    from wpk.runtime.batching import BatchPolicy
    from wpk.runtime.server import ServeConfig, build_parser

    args = build_parser().parse_args([
        str(plans["mlp"]), "--tier", "cloud", "--port", "0", "--next", "edge:9000",
        "--max-batch", "8", "--max-queue-delay-us", "500", "--max-message-mb", "4",
        "--restart-count", "2", "--no-shared-memory", "--link", "grpc", "--cpus", "0"])
    config = ServeConfig.from_args(args)
    assert (config.plan_dir, config.tier, config.port) == (str(plans["mlp"]), "cloud", 0)
    assert config.next_address == "edge:9000" and config.link == "grpc"
    assert config.batching == BatchPolicy(8, 0.0005)
    assert config.max_message_bytes == 4 * 1024 * 1024
    assert config.restarts == 2 and config.shared_memory is False
    assert config.threads == 1          # one CPU given, --threads 0: one physical core
    default = ServeConfig.from_args(build_parser().parse_args([str(plans["mlp"]), "--tier",
                                                               "cloud"]))
    assert default == ServeConfig(str(plans["mlp"]), "cloud", batching=BatchPolicy(1, 0.001))


def test_flags_that_contradict_each_other_are_refused_by_the_config(plans):
    from wpk.errors import WpkError
    from wpk.runtime.server import ServeConfig, build_parser

    args = build_parser().parse_args([str(plans["mlp"]), "--tier", "cloud", "--tls-dir", ".",
                                      "--link", "tcp"])
    with pytest.raises(WpkError, match="--link tcp with --tls-dir"):
        ServeConfig.from_args(args)


@pytest.mark.parametrize("options, message", [
    ({"link": "tpc"}, r"unknown link 'tpc' \(did you mean 'tcp'\? choose from tcp, grpc\)"),
    ({"run": "inlined"}, r"unknown run placement 'inlined' \(did you mean 'inline'\? "),
])
def test_a_tier_core_from_python_names_its_unknown_choices(plans, options, message):
    """Python callers (serve(...), TierCore) are told in the parameter's words, no flag."""
    from wpk.errors import WpkError
    from wpk.plan import load_plan
    from wpk.runtime.tier_core import TierCore

    with pytest.raises(WpkError, match=message):
        TierCore(load_plan(plans["mlp"]), plans["mlp"], "cloud", None, **options)
