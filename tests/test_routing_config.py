"""Loading and validating routing files: every problem with its path and line."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skyroute.routing import (
    DEFAULT_METRIC_NAMES,
    ConfigError,
    PoolMetricNames,
    parse_config,
    parse_duration,
    parse_size,
)

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
    assert_problem(CONTRACT.replace(*edit), path, line, fragment)


def assert_problem(text: str, path: str, line: int, fragment: str) -> None:
    """Loading ``text`` fails with a problem at ``path`` on ``line`` saying ``fragment``."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=ENV)
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


SCRAPE = """\
latency:
  scrape:
    interval: 2s
    timeout: 300ms
    health_path: /v1/models
    unhealthy_after: 3
    metrics:
      waiting: [my_queue_depth]
      kv_cache_usage: []
"""


def test_latency_scrape_section_sets_pool_scraping():
    """latency.scrape sets the pool scrape; a metrics list replaces only its own defaults."""
    config = parse_config(SCRAPE + CONTRACT, env=ENV)
    scrape = config.latency.scrape
    assert (scrape.interval_s, scrape.timeout_s, scrape.unhealthy_after) == (2.0, 0.3, 3)
    assert scrape.metrics == PoolMetricNames(
        waiting=("my_queue_depth",), running=DEFAULT_METRIC_NAMES.running, kv_cache_usage=())
    assert scrape.stale_after_s == 6.3
    assert scrape.health_url("http://10.0.0.5:8000/v1") == "http://10.0.0.5:8000/v1/models"
    assert scrape.metrics_url("https://gpu.internal/v1/") == "https://gpu.internal/metrics"
    assert config.upstream("local-gpu").scrape is True


def test_latency_scrape_defaults():
    """Without a scrape section pools are scraped every second with the vLLM/SGLang names."""
    scrape = parse_config(CONTRACT, env=ENV).latency.scrape
    assert (scrape.interval_s, scrape.timeout_s) == (1.0, 0.5)
    assert (scrape.metrics_path, scrape.health_path) == ("/metrics", "/health")
    assert scrape.metrics == DEFAULT_METRIC_NAMES


def test_upstream_scrape_false_switches_a_pool_off():
    """scrape: false on a pool upstream turns its scraping off."""
    text = CONTRACT.replace("    region: onprem\n", "    region: onprem\n    scrape: false\n")
    assert parse_config(text, env=ENV).upstream("local-gpu").scrape is False


SCRAPE_BAD_CASES = [
    # (edit to SCRAPE + CONTRACT, expected path, expected line, fragment of the message)
    (("    interval: 2s", "    intervl: 2s"), "latency.scrape.intervl", 3,
     "did you mean 'interval'"),
    (("    timeout: 300ms", "    timeout: soon"), "latency.scrape.timeout", 4, "250ms"),
    (("health_path: /v1/models", "health_path: v1/models"), "latency.scrape.health_path", 5,
     "must start with /"),
    (("    interval: 2s", "    interval: 0s"), "latency.scrape.interval", 3, "must be above 0"),
    (("[my_queue_depth]", "[my queue depth]"), "latency.scrape.metrics.waiting[0]", 8,
     "not a Prometheus metric name"),
    (("      kv_cache_usage: []", "      kv_cache: []"), "latency.scrape.metrics.kv_cache", 9,
     "did you mean 'kv_cache_usage'"),
    (("    unhealthy_after: 3", "    unhealthy_after: 0"), "latency.scrape.unhealthy_after", 6,
     "positive whole number"),
    (("    region: onprem\n", "    region: onprem\n    scrape: maybe\n"),
     "upstreams[1].scrape", 26, "true or false"),
]


@pytest.mark.parametrize(("edit", "path", "line", "fragment"), SCRAPE_BAD_CASES)
def test_bad_scrape_settings_name_field_and_line(edit, path, line, fragment):
    """Mistakes in latency.scrape or an upstream's scrape are reported at path and line."""
    assert_problem((SCRAPE + CONTRACT).replace(*edit), path, line, fragment)


def test_scrape_that_is_not_a_mapping_is_one_problem():
    """latency.scrape given as a scalar is reported once, at its line."""
    with pytest.raises(ConfigError) as caught:
        parse_config("latency:\n  scrape: yes\n" + CONTRACT, env=ENV)
    assert [(p.path, p.line) for p in caught.value.problems] == [("latency.scrape", 2)]


# CONTRACT's chat route, with a fallback to a smaller model on the local pool (an
# implicit route) and the degradation section; lines 21-29.
DEGRADED = CONTRACT.replace(
    "    models: {chat: deepseek-r1-distill-qwen-7b}",
    "    models: {chat: deepseek-r1-distill-qwen-7b, chat-small: deepseek-r1-distill-qwen-1.5b}",
) + """\
    fallback_model: chat-small
    essential: true
degradation:
  reduced: {hedging: false}
  fallback: {enabled: true}
  minimal:
    when_available_below: 40%
    max_tokens: 128
    max_n: 2
"""


def test_degradation_settings_load():
    """fallback_model, essential and the degradation section become typed settings."""
    config = parse_config(DEGRADED, env=ENV)
    chat = config.route_for("chat")
    assert (chat.fallback_model, chat.essential) == ("chat-small", True)
    assert config.route_for("chat-small").implicit  # an implicit route may be a fallback
    policy = config.degradation
    assert (policy.reduced_hedging, policy.fallback_enabled, policy.minimal_below,
            policy.minimal_max_tokens, policy.minimal_max_n) == (False, True, 0.4, 128, 2)


def test_degradation_defaults_without_the_section():
    """With no degradation section: hedging and fallback on, minimal below 50 %, 256, 1."""
    config = parse_config(CONTRACT, env=ENV)
    policy = config.degradation
    assert (policy.reduced_hedging, policy.fallback_enabled, policy.minimal_below,
            policy.minimal_max_tokens, policy.minimal_max_n) == (True, True, 0.5, 256, 1)
    assert config.route_for("chat").fallback_model is None
    assert not config.route_for("chat").essential


DEGRADATION_BAD_CASES = [
    (("fallback_model: chat-small", "fallback_model: chat-smal"), "routes[0].fallback_model",
     21, "names no route; did you mean 'chat-small'?"),
    (("fallback_model: chat-small", "fallback_model: chat"), "routes[0].fallback_model", 21,
     "this route's own model"),
    (("essential: true", "essential: sometimes"), "routes[0].essential", 22, "true or false"),
    (("  minimal:", "  minimum:"), "degradation.minimum", 26, "did you mean 'minimal'"),
    (("when_available_below: 40%", "when_available_below: 140%"),
     "degradation.minimal.when_available_below", 27, "between 0% and 100%"),
    (("max_tokens: 128", "max_token: 128"), "degradation.minimal.max_token", 28,
     "did you mean 'max_tokens'"),
    (("max_n: 2", "max_n: 0"), "degradation.minimal.max_n", 29, "positive whole number"),
    (("reduced: {hedging: false}", "reduced: {hedging: no way}"),
     "degradation.reduced.hedging", 24, "true or false"),
]


@pytest.mark.parametrize(("edit", "path", "line", "fragment"), DEGRADATION_BAD_CASES)
def test_bad_degradation_settings_name_field_and_line(edit, path, line, fragment):
    """Mistakes in fallback_model, essential or degradation are reported at path and line."""
    assert_problem(DEGRADED.replace(*edit), path, line, fragment)


def test_fallback_models_that_loop_are_refused():
    """chat -> chat-small -> chat is refused at both routes, naming the loop."""
    text = DEGRADED.replace("degradation:", "  - model: chat-small\n    targets: [local-gpu]\n"
                                            "    fallback_model: chat\ndegradation:")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=ENV)
    problems = {(p.path, p.line): p.message for p in caught.value.problems}
    assert problems[("routes[0].fallback_model", 21)].startswith(
        "fallbacks loop: chat -> chat-small -> chat;")
    assert problems[("routes[1].fallback_model", 25)].startswith(
        "fallbacks loop: chat-small -> chat -> chat-small;")


def test_sync_ping_keys_set_how_fast_a_cut_is_seen():
    """sync.ping_every and dead_after_missed_pings reach SyncPolicy; defaults are 1 s and 3."""
    base = CONTRACT + "sync:\n  token: t0k\n"
    default = parse_config(base, env=ENV).sync
    assert default is not None and (default.ping_interval_s, default.ping_misses) == (1.0, 3)
    tuned = parse_config(base + "  ping_every: 250ms\n  dead_after_missed_pings: 4\n", env=ENV)
    assert tuned.sync is not None
    assert (tuned.sync.ping_interval_s, tuned.sync.ping_misses) == (0.25, 4)
    with pytest.raises(ConfigError, match="dead_after_missed_pings"):
        parse_config(base + "  dead_after_missed_pings: 0\n", env=ENV)
    with pytest.raises(ConfigError, match="ping_every"):
        parse_config(base + "  ping_every: 0s\n", env=ENV)


REFUSED_VALUES = [
    # (edit to CONTRACT, expected path, expected line, fragment of the message)
    (("    region: us-east\n", "    region: us-east\n    first_token_timeout: -5\n"),
     "upstreams[0].first_token_timeout", 11, "negative"),
    (("routes:", "latency:\n  interval: -1\nroutes:"), "latency.interval", 19, "negative"),
    (("  - model: chat\n", "  - model: chat\n    timeout: .nan\n"), "routes[0].timeout", 20,
     "finite"),
    (("routes:", "limits:\n  max_body_bytes: -1\nroutes:"), "limits.max_body_bytes", 19,
     "negative"),
    (("  - model: chat\n", "  - model: chat\n    max_attempts: .inf\n"),
     "routes[0].max_attempts", 20, "positive whole number"),
    (("  - model: chat\n", "  - model: chat\n    hedge_after: .inf\n"),
     "routes[0].hedge_after", 20, "finite"),
    (("routes:", "retry:\n  budget: .nan\nroutes:"), "retry.budget", 19, "finite"),
    (("    region: us-east\n", "    region: us-east\n    connect_timeout: 0s\n"),
     "upstreams[0].connect_timeout", 11, "must be above 0"),
    (("url: https://example.com/v1", "url: https://user:pw@example.com/v1"),
     "upstreams[0].url", 8, "put the upstream's key in api_key"),
    (("http://10.0.0.6:8000/v1]", "http://u:p@10.0.0.6:8000/v1]"), "upstreams[1].endpoints[1]",
     15, "put the upstream's key in api_key"),
    (("    region: onprem\n", "    region: onprem\n    region: cloud\n"), "upstreams[1].region",
     17, "given twice (first on line 16)"),
    (("listen: 127.0.0.1:8080\n", "listen: 127.0.0.1:8080\nlisten: :9090\n"), "listen", 2,
     "given twice"),
    (("{chat: deepseek-r1-distill-qwen-7b}", "{chat: a, chat: b}"), "upstreams[1].models.chat",
     17, "given twice"),
    (("    region: us-east\n", "    region: us-east\n    max_connections: 0\n"),
     "upstreams[0].max_connections", 11, "positive whole number"),
]


@pytest.mark.parametrize(("edit", "path", "line", "fragment"), REFUSED_VALUES)
def test_negative_non_finite_duplicate_and_credential_values_are_refused(edit, path, line,
                                                                          fragment):
    """Negative or non-finite durations, sizes and counts, duplicate keys at any depth and
    a user or password in an upstream URL are each a problem at their path and line."""
    assert_problem(CONTRACT.replace(*edit), path, line, fragment)


LISTED_TWICE = [
    # (edit to CONTRACT, expected path, expected line, fragment of the message)
    (("[aws-us-east, local-gpu]", "[aws-us-east, local-gpu, aws-us-east]"),
     "routes[0].targets[2]", 20,
     "upstream 'aws-us-east' is listed twice (first at routes[0].targets[0], line 20); keep "
     "one: no upstream takes two attempts of one request"),
    (("    targets: [aws-us-east, local-gpu]\n",
      "    targets:\n      - local-gpu\n      - aws-us-east\n      - local-gpu\n"),
     "routes[0].targets[2]", 23, "(first at routes[0].targets[0], line 21)"),
    (("http://10.0.0.6:8000/v1]", "http://10.0.0.5:8000/v1/]"), "upstreams[1].endpoints[1]",
     15, "endpoint 'http://10.0.0.5:8000/v1/' is listed twice"),
    (("auth:\n", "auth:\n  key_headers: [Authorization, authorization]\n"),
     "auth.key_headers[1]", 3, "header 'authorization' is listed twice"),
    (("    region: us-east\n",
      "    region: us-east\n    forward_headers: [OpenAI-Project, openai-project]\n"),
     "upstreams[0].forward_headers[1]", 11, "header 'openai-project' is listed twice"),
    (("      key: ${WEB_APP_KEY}\n",
      "      key: ${WEB_APP_KEY}\n    - name: batch\n      key: ${WEB_APP_KEY}\n"),
     "auth.api_keys[1]", 6, "'batch' has the same key as the client at auth.api_keys[0], "
     "line 4"),
    (("routes:", "trusted_proxies: [10.0.0.0/8, 10.1.2.3/8]\nroutes:"), "trusted_proxies[1]",
     18, "the same network"),
    (("routes:", "sync:\n  token: t\n  peers: [ws://a:8080/sync, ws://a:8080/sync/]\nroutes:"),
     "sync.peers[1]", 20, "peer 'ws://a:8080/sync/' is listed twice"),
]


@pytest.mark.parametrize(("edit", "path", "line", "fragment"), LISTED_TWICE)
def test_an_item_listed_twice_is_refused_at_its_line(edit, path, line, fragment):
    """A route target, pool endpoint, header, client key, trusted network or peer listed
    twice (compared as skyroute reads them) is a problem at the second copy's path and
    line, naming where the first is."""
    assert_problem(CONTRACT.replace(*edit), path, line, fragment)


def test_a_client_key_listed_twice_is_not_shown_in_the_problem():
    """Two clients with one key are refused without the key itself in the message."""
    text = CONTRACT.replace("      key: ${WEB_APP_KEY}\n", "      key: ${WEB_APP_KEY}\n"
                            "    - name: batch\n      key: ${WEB_APP_KEY}\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=ENV)
    assert ENV["WEB_APP_KEY"] not in str(caught.value)


def test_blank_client_keys_from_the_environment_are_not_duplicates():
    """Optional keys whose variables are empty are unused slots, however many there are."""
    text = CONTRACT.replace("      key: ${WEB_APP_KEY}\n", "      key: ${WEB_APP_KEY}\n"
                            "    - {name: spare1, key: '${SPARE1:-}'}\n"
                            "    - {name: spare2, key: '${SPARE2:-}'}\n")
    assert [k.name for k in parse_config(text, env=ENV).api_keys] == ["web-app"]


@pytest.mark.parametrize("text", ["listen: :8080\n", "listen: :8080\nupstreams: []\n"])
def test_a_file_without_upstreams_is_refused(text):
    """A routing file must name at least one upstream."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={})
    (problem,) = caught.value.problems
    assert "upstreams" in f"{problem.path} {problem.message}"


def test_a_bad_upstream_is_its_own_problem_not_an_empty_list():
    """An upstream entry with a problem is reported at that entry only: the list it is in
    is not also called empty."""
    text = "upstreams:\n  - {name: a, url: http://127.0.0.1:1/v1, regoin: x}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={})
    assert [(p.path, p.line) for p in caught.value.problems] == [("upstreams[0].regoin", 2)]


def test_an_unset_variable_is_one_problem():
    """An unset ${VAR} is reported once, not again as the empty value it left."""
    with pytest.raises(ConfigError) as caught:
        parse_config(CONTRACT.replace("https://example.com/v1", "${AWS_URL}"), env=ENV)
    assert [(p.path, p.line) for p in caught.value.problems] == [("upstreams[0].url", 8)]
    assert "AWS_URL is not set" in caught.value.problems[0].message


def test_problems_are_sorted_by_line():
    """Problems found by different checks come out in file order."""
    text = CONTRACT.replace("region: us-east", "regon: us-east").replace(
        "local-gpu]", "gcp]").replace("${WEB_APP_KEY}", "${NOPE}")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=ENV)
    lines = [p.line for p in caught.value.problems]
    assert lines == sorted(lines) and len(lines) == 3


def test_settings_keep_their_defaults_and_units():
    """Durations are seconds, sizes bytes, shares fractions; unset sections keep defaults."""
    config = parse_config(CONTRACT.replace("routes:", "limits: {max_body_bytes: 2MiB}\n"
                                                      "retry: {budget: 10%, backoff_cap: 2s}\n"
                                                      "routes:"), env=ENV)
    assert config.limits.max_body_bytes == 2 * 1024 * 1024
    assert (config.retry.budget, config.retry.backoff_cap_s) == (0.1, 2.0)
    assert config.retry.backoff_base_s == 0.025 and config.breaker.max_cooldown_s > 0
    aws = config.upstream("aws-us-east")
    assert (aws.first_token_timeout_s, aws.max_connections, aws.weight) == (30.0, 256, 1)
    assert config.instance_id == "skyroute" and config.admin_key is None


def test_routes_are_replaced_with_validation():
    """dataclasses.replace on a route validates again, as per-route overrides need."""
    import dataclasses

    from pydantic import ValidationError

    route = parse_config(CONTRACT, env=ENV).route_for("chat")
    assert dataclasses.replace(route, timeout_s=5.0).timeout_s == 5.0
    with pytest.raises(ValidationError):
        dataclasses.replace(route, timeout_s=-1.0)


BILLION_LAUGHS = "".join(
    ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n']
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)]
    + ["fallback_model: *l8\n"])

HOSTILE = [
    # (file content, fragment of the one problem)
    (CONTRACT.encode() + b"# caf\xe9\n", "not UTF-8"),
    (BILLION_LAUGHS, "aliases expand to more than"),
    ("a: &a [*a]\n" + CONTRACT, "alias refers to the anchor it is inside of"),
    ("routes: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than"),
    (CONTRACT.replace("127.0.0.1:8080", "7" * 4_400), "too many digits"),
    ("listen: .inf\n" + CONTRACT.replace("listen: 127.0.0.1:8080\n", ""), "host:port"),
    ("upstreams: \x00\n", "invalid YAML"),
    (b"\xff\xfe\x00", "not UTF-8"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("", "empty"),
    ("a: !!python/object/apply:os.system [echo]\n" + CONTRACT, "cannot read this value"),
]


@pytest.mark.parametrize(("text", "fragment"), HOSTILE,
                         ids=["not-utf8", "alias-bomb", "alias-loop", "deep-nesting",
                              "huge-integer", "inf", "control-char", "bad-bytes",
                              "not-a-mapping", "empty", "python-tag"])
def test_hostile_file_is_one_problem_with_a_line(text, fragment):
    """A hostile or broken file is one ConfigError problem with a line, never a traceback."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=ENV, source="hostile.yaml")
    (problem,) = caught.value.problems
    assert problem.line is not None and fragment in problem.message, problem


def test_text_over_the_size_cap_is_refused_before_parsing():
    """Text over MAX_CONFIG_BYTES is refused without being parsed."""
    from skyroute.routing import MAX_CONFIG_BYTES

    with pytest.raises(ConfigError) as caught:
        parse_config("#" * (MAX_CONFIG_BYTES + 1), env={})
    assert "larger than" in caught.value.problems[0].message


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 st.sampled_from([CONTRACT, SCRAPE + CONTRACT, DEGRADED]).flatmap(
                     lambda base: st.tuples(st.just(base), st.integers(0, len(base)),
                                            st.text(max_size=12)).map(
                         lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]))))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_input_gives_a_config_or_config_problems(text):
    """Whatever the bytes, the loader returns a Config or raises ConfigError: no other error."""
    try:
        parse_config(text, env=ENV)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p.message, str) for p in exc.problems)
def test_limits_and_connection_keys_parse_and_are_checked():
    """limits (timeouts, connection cap), upstream max_connections/pool_timeout and a key's
    max_concurrent are read; a zero or a wrong type is a problem naming the field."""
    text = ("limits: {head_timeout: 5s, body_timeout: 250ms, keepalive_timeout: 1m, "
            "max_client_connections: 100}\n"
            "auth: {api_keys: [{name: a, key: sk-a-123456, max_concurrent: 3}]}\n"
            "upstreams: [{name: u, url: 'http://u/v1', max_connections: 8, pool_timeout: 1s}]\n")
    config = parse_config(text, env={})
    limits = config.limits
    assert (limits.head_timeout_s, limits.body_timeout_s, limits.keepalive_timeout_s,
            limits.max_client_connections) == (5.0, 0.25, 60.0, 100)
    assert config.api_keys[0].max_concurrent == 3
    assert (config.upstreams[0].max_connections, config.upstreams[0].pool_timeout_s) == (8, 1.0)
    with pytest.raises(ConfigError) as bad:
        parse_config("limits: {max_client_connections: 0, head_timeout: soon}\n"
                     "upstreams: [{name: u, url: 'http://u/v1'}]\n", env={})
    text = str(bad.value)
    assert "max_client_connections" in text and "head_timeout" in text


JOB_TARGETS = CONTRACT.replace("    targets: [aws-us-east, local-gpu]\n",
                               "    targets: [aws-us-east]\n") + """\
jobs:
  targets:
    chat: [local-gpu]
"""


def test_jobs_targets_load_per_model_alias():
    """jobs.targets: a model alias -> the upstreams its jobs try first, as written."""
    config = parse_config(JOB_TARGETS, env=ENV)
    assert config.jobs is not None and dict(config.jobs.targets) == {"chat": ("local-gpu",)}
    assert config.route_for("chat").targets == ("aws-us-east",)


@pytest.mark.parametrize(("edit", "path", "line", "fragment"), [
    (("chat: [local-gpu]", "chat: [local-gpu, gcp]"), "jobs.targets.chat[1]", 23,
     "'gcp' names no upstream (upstreams: aws-us-east, local-gpu)"),
    (("chat: [local-gpu]", "chta: [local-gpu]"), "jobs.targets.chta", 23,
     "'chta' names no route; did you mean 'chat'?"),
    (("chat: [local-gpu]", "embed: [local-gpu]"), "jobs.targets.embed[0]", 23,
     "upstream 'local-gpu' has no model for alias 'embed'"),
    (("chat: [local-gpu]", "chat: [local-gpu, local-gpu]"), "jobs.targets.chat[1]", 23,
     "upstream 'local-gpu' is listed twice (first at jobs.targets.chat[0], line 23)"),
    (("chat: [local-gpu]\n", "chat: [local-gpu]\n  webhook_hosts: [Example.com, example.com]\n"),
     "jobs.webhook_hosts[1]", 24, "host 'example.com' is listed twice"),
    (("chat: [local-gpu]", "chat: []"), "jobs.targets.chat", 23, "must not be empty"),
])
def test_bad_jobs_targets_are_reported_at_path_and_line(edit, path, line, fragment):
    assert_problem(JOB_TARGETS.replace(*edit), path, line, fragment)


def test_jobs_lane_keys_load_and_default():
    """jobs.lane: how the lane yields to clients (its CPU share, loop lag, trickle)."""
    config = parse_config(JOB_TARGETS + "  lane: {cpu: 25%, loop_lag: 2ms, trickle: 500ms}\n",
                          env=ENV)
    assert config.jobs is not None
    assert (config.jobs.lane.cpu, config.jobs.lane.loop_lag_s,
            config.jobs.lane.trickle_s) == (0.25, 0.002, 0.5)
    default = parse_config(JOB_TARGETS, env=ENV).jobs
    assert default is not None and (default.lane.cpu, default.lane.loop_lag_s) == (0.4, 0.001)


@pytest.mark.parametrize(("lane", "path", "fragment"), [
    ("{cpu: 0}", "jobs.lane", "cpu must be above 0"),
    ("{cpu: 140%}", "jobs.lane.cpu", "not between 0% and 100%"),
    ("{loop_lag: 0s}", "jobs.lane.loop_lag", "must be above 0"),
    ("{trickle: often}", "jobs.lane.trickle", "not a duration"),
    ("{cpu_share: 0.3}", "jobs.lane.cpu_share", ""),
])
def test_bad_jobs_lane_keys_are_reported_at_path_and_line(lane, path, fragment):
    assert_problem(JOB_TARGETS + f"  lane: {lane}\n", path, 24, fragment)
