"""Loading and validating routing files: every problem with its path and line."""

from __future__ import annotations

import pytest

from routing import ConfigError, parse_config, parse_duration, parse_size

CONTRACT = """\
listen: 127.0.0.1:8080
auth:
  api_keys:
    - name: web-app
      key: ${WEB_APP_KEY}
upstreams:
  - name: aws-us-east
    url: https://example.com/v1
    api_key: ${AWS_KEY}
    region: us-east
    models:
      chat: deepseek-chat
      embed: text-embedding-3-small
  - name: local-gpu
    endpoints: [http://10.0.0.5:8000/v1, http://10.0.0.6:8000/v1]
    region: onprem
    models: {chat: deepseek-r1-distill-qwen-7b}
routes:
  - model: chat
    targets: [aws-us-east, local-gpu]
"""
ENV = {"WEB_APP_KEY": "sk-web", "AWS_KEY": "sk-aws"}


def test_contract_example_loads_with_env_expanded():
    """The issue's YAML contract loads: keys from the environment, pools, routes."""
    config = parse_config(CONTRACT, env=ENV)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert config.api_keys is not None and config.api_keys[0].key == "sk-web"
    aws = config.upstream("aws-us-east")
    assert aws.api_key == "sk-aws" and aws.model_for("chat") == "deepseek-chat"
    gpu = config.upstream("local-gpu")
    assert gpu.is_pool and gpu.endpoints[1] == "http://10.0.0.6:8000/v1"
    assert config.route_for("chat").targets == ("aws-us-east", "local-gpu")


def test_alias_named_by_no_route_goes_to_every_upstream_offering_it():
    """'embed' has no route, so an implicit one targets each upstream that offers it."""
    config = parse_config(CONTRACT, env=ENV)
    embed = config.route_for("embed")
    assert embed is not None and embed.implicit and embed.targets == ("aws-us-east",)


def test_default_expansion_and_secrets_not_in_repr():
    """${VAR:-default} falls back to its default, and keys never show in repr."""
    config = parse_config(CONTRACT.replace("${AWS_KEY}", "${AWS_KEY:-sk-fallback}"),
                          env={"WEB_APP_KEY": "sk-web"})
    assert config.upstream("aws-us-east").api_key == "sk-fallback"
    assert "sk-fallback" not in repr(config) and "sk-web" not in repr(config)


BAD_CASES = [
    # (edit to CONTRACT, expected path, expected line, fragment of the message)
    (("    region: us-east", "    regon: us-east"), "upstreams[0].regon", 10,
     "did you mean 'region'"),
    (("targets: [aws-us-east, local-gpu]", "targets: [aws-us-east, gcp]"),
     "routes[0].targets[1]", 20, "'gcp' names no upstream"),
    (("${AWS_KEY}", "${MISSING_KEY}"), "upstreams[0].api_key", 9, "MISSING_KEY is not set"),
    (("url: https://example.com/v1", "url: example.com/v1"), "upstreams[0].url", 8,
     "must start with http"),
    (("listen: 127.0.0.1:8080", "listen: localhost"), "listen", 1, "host:port"),
    (("  - model: chat\n", "  - model: chat\n    strategy: fastest\n"), "routes[0].strategy",
     20, "not one of"),
    (("  - model: chat\n", "  - model: chat\n    latency_threshold: soon\n"),
     "routes[0].latency_threshold", 20, "250ms"),
    (("routes:", "rutes:"), "rutes", 18, "did you mean 'routes'"),
    (("    models: {chat: deepseek-r1-distill-qwen-7b}", "    models: {other: x}"),
     "routes[0].targets[1]", 20, "no model for alias 'chat'"),
    (("  - model: chat\n", "  - model: chat\n    resume: sometimes\n"), "routes[0].resume",
     20, "true or false"),
]


@pytest.mark.parametrize(("edit", "path", "line", "fragment"), BAD_CASES)
def test_bad_file_names_field_and_line(edit, path, line, fragment):
    """Each kind of mistake is reported at its YAML path and line with a helpful message."""
    with pytest.raises(ConfigError) as caught:
        parse_config(CONTRACT.replace(*edit), env=ENV)
    matching = [p for p in caught.value.problems if p.path == path]
    assert matching, caught.value.problems
    assert matching[0].line == line
    assert fragment in matching[0].message


def test_all_problems_are_reported_at_once():
    """Several mistakes in one file are all listed, not only the first."""
    text = CONTRACT.replace("region: us-east", "regon: us-east").replace(
        "local-gpu]", "gcp]").replace("${AWS_KEY}", "${NOPE}")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=ENV)
    assert len(caught.value.problems) == 3


def test_yaml_syntax_error_has_a_line():
    """A YAML syntax error is reported with its line."""
    with pytest.raises(ConfigError) as caught:
        parse_config("upstreams:\n  - name: [a\n", env={})
    assert caught.value.problems[0].line is not None
    assert "invalid YAML" in caught.value.problems[0].message


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("2s", 2.0), ("10m", 600.0),
                                               ("1h", 3600.0), (3, 3.0), ("1.5s", 1.5)])
def test_parse_duration_accepts_units(text, seconds):
    """Durations accept ms, s, m, h and bare seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("1KiB", 1024), ("16MiB", 16 << 20), (100, 100),
                                           ("2MB", 2_000_000)])
def test_parse_size_accepts_units(text, size):
    """Sizes accept B, KB/KiB, MB/MiB, GB/GiB and bare bytes."""
    assert parse_size(text) == size


def test_stream_resume_is_off_unless_a_route_turns_it_on():
    plain = parse_config(CONTRACT, env=ENV)
    resuming = parse_config(CONTRACT.replace("  - model: chat\n",
                                             "  - model: chat\n    resume: ${RESUME}\n"),
                            env={**ENV, "RESUME": "true"})
    assert plain.routes[0].resume is False
    assert resuming.routes[0].resume is True
