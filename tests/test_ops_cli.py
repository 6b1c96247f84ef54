"""The `alluse` command against the real service: `alluse serve` in a subprocess on a
fresh test database, driven by the installed console script. Also what that running
service exports and logs: every metric the Grafana dashboard queries, the /metrics token,
JSON log lines with request ids and without secrets."""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli import app
from tests.ops_helpers import Service, alluse, alluse_json, clean_env, create_database, drop_database, free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "ops-cli-admin-token-0123456789abcdef0123"
METRICS_TOKEN = "ops-cli-metrics-token-9876543210fedcba"


@pytest.fixture(scope="module")
def service(postgres_server_uri, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ops-cli")
    url = create_database(postgres_server_uri)
    port = free_port()
    env = clean_env(DATABASE_URL=url, ALLUSE_PORT=str(port), ALLUSE_HOST="127.0.0.1",
                    ALLUSE_ADMIN_TOKEN=ADMIN_TOKEN, ALLUSE_DATA_DIR=str(workdir / "data"),
                    ALLUSE_METRICS_TOKEN=METRICS_TOKEN, ALLUSE_LOG_FORMAT="json", ALLUSE_ACCESS_LOG="1",
                    ALLUSE_LOG_LEVEL="INFO", ALLUSE_WEBHOOKS_ALLOW_PRIVATE="1")
    running = Service(env, workdir, port)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()
        drop_database(postgres_server_uri, url)


@pytest.fixture
def cli_env(service):
    """What an operator's shell has: the URL and a token, nothing else."""
    return clean_env(ALLUSE_URL=service.url, ALLUSE_TOKEN=ADMIN_TOKEN)


def make_account(service, owner: str, name: str, deposit: int = 0) -> dict:
    status, account, _ = service.request("POST", "/v1/accounts", token=ADMIN_TOKEN,
                                         body={"name": name, "type": "revenue", "owner": owner})
    assert status == 201, account
    if deposit:
        status, entry, _ = service.request("POST", f"/v1/accounts/{account['id']}/deposits", token=ADMIN_TOKEN,
                                           body={"amount": deposit}, headers={"Idempotency-Key": str(uuid.uuid4())})
        assert status == 201, entry
    return account


def test_remote_commands_show_accounts_move_money_and_manage_tokens(service, cli_env):
    source = make_account(service, "ann", "Rev-Acc A", deposit=100_000)
    target = make_account(service, "ann", "Rev-Acc B")

    listed = alluse_json("accounts", "list", "--owner", "ann", env=cli_env)
    assert {a["id"] for a in listed["items"]} >= {source["id"], target["id"]} and listed["next_cursor"] is None
    table = alluse("accounts", "list", "--owner", "ann", env=cli_env)
    assert table.returncode == 0 and source["id"] in table.stdout and "$1,000.00" in table.stdout, table

    moved = alluse_json("transfer", source["id"], target["id"], "25000", "--memo", "rebalance",
                        "--idempotency-key", "cli-transfer-1", env=cli_env)
    assert [leg["direction"] for leg in moved["legs"]] == ["debit", "credit"]
    again = alluse_json("transfer", source["id"], target["id"], "25000", "--memo", "rebalance",
                        "--idempotency-key", "cli-transfer-1", env=cli_env)
    assert again["id"] == moved["id"], "a retry with the same key is the same transfer"
    shown = alluse_json("accounts", "show", target["id"], env=cli_env)
    assert shown["account"]["balance"] == 25_000 and shown["transactions"][0]["amount"] == 25_000

    status, portfolio, _ = service.request("POST", "/v1/portfolios", token=ADMIN_TOKEN,
                                           body={"name": "Ann", "owner": "ann-p", "initial_capital": 300_000_00})
    assert status == 201, portfolio
    generation = next(a["id"] for a in portfolio["accounts"] if a["type"] == "generation")
    status, premium, _ = service.request("POST", f"/v1/accounts/{generation}/trades", token=ADMIN_TOKEN,
                                         body={"kind": "premium", "amount": 10_000_00},
                                         headers={"Idempotency-Key": str(uuid.uuid4())})
    assert status == 201, premium
    status, fork, _ = service.request("POST", f"/v1/accounts/{generation}/fork", token=ADMIN_TOKEN,
                                      body={"amount": 10_000_00}, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert status == 201, fork
    # Roots only, by name, with the whole tree's totals (the unit's money included).
    portfolios = alluse_json("portfolios", "list", "--owner", "ann-p", env=cli_env)
    [listed_portfolio] = portfolios["items"]
    assert listed_portfolio["id"] == portfolio["id"] and listed_portfolio["name"] == "Ann"
    assert listed_portfolio["totals"]["balance"] == 310_000_00 and listed_portfolio["units_active"] == 1
    assert portfolios["next_cursor"] is None
    shown = alluse("portfolios", "list", "--owner", "ann-p", env=cli_env)
    assert shown.returncode == 0 and "Ann" in shown.stdout and "$310,000.00" in shown.stdout, shown
    assert fork["portfolio_id"] not in shown.stdout and "more:" not in shown.stdout, shown
    tree = alluse("portfolios", "tree", portfolio["id"], env=cli_env)
    assert tree.returncode == 0 and portfolio["id"] in tree.stdout and fork["portfolio_id"] in tree.stdout, tree

    created = alluse_json("tokens", "create", "ann dashboard", "--role", "viewer", "--owner", "ann", env=cli_env)
    assert created["token"].startswith("alu_") and created["role"] == "viewer"
    as_viewer = clean_env(ALLUSE_URL=service.url, ALLUSE_TOKEN=created["token"])
    assert {a["owner"] for a in alluse_json("accounts", "list", env=as_viewer)["items"]} == {"ann"}
    assert created["id"] in {t["id"] for t in alluse_json("tokens", "list", env=cli_env)}
    revoked = alluse_json("tokens", "revoke", created["id"], env=cli_env)
    assert revoked["revoked_at"] is not None
    refused = alluse("accounts", "list", env=as_viewer)
    assert refused.returncode == 1 and "401 unauthorized" in refused.stderr, refused

    verified = alluse_json("audit", "verify", env=cli_env)
    assert verified["valid"] is True and verified["records"] >= 5
    status_table = alluse("status", env=cli_env)
    assert status_table.returncode == 0 and "database healthy" in status_table.stdout, status_table
    assert alluse_json("status", env=cli_env)["supervisor"]["database_healthy"] is True


def test_a_list_cut_by_its_limit_says_how_to_get_the_rest(service, cli_env):
    made = [make_account(service, "pager", f"Rev-Acc {index}")["id"] for index in range(3)]
    for index in range(3):
        status, created, _ = service.request("POST", "/v1/portfolios", token=ADMIN_TOKEN,
                                             body={"name": f"Pager {index}", "owner": "pager-p",
                                                   "initial_capital": 1_000_00})
        assert status == 201, created
    # Three of each: accounts of "pager" (alone), root portfolios of "pager-p".
    for command, owner in (("accounts", "pager"), ("portfolios", "pager-p")):
        first = alluse(command, "list", "--owner", owner, "--limit", "2", env=cli_env)
        assert first.returncode == 0, first
        last_line = first.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"more: --cursor \S+", last_line), (command, first.stdout)
        cursor = last_line.split()[-1]
        page = alluse_json(command, "list", "--owner", owner, "--limit", "2", env=cli_env)
        assert len(page["items"]) == 2 and page["next_cursor"] == cursor, (command, page)
        rest = alluse_json(command, "list", "--owner", owner, "--cursor", cursor, env=cli_env)
        assert len(rest["items"]) == 1 and rest["next_cursor"] is None, (command, rest)
        assert "more:" not in alluse(command, "list", "--owner", owner, "--cursor", cursor, env=cli_env).stdout
    assert [a["id"] for a in alluse_json("accounts", "list", "--owner", "pager", env=cli_env)["items"]] == made


def test_a_failing_command_prints_one_error_line_and_exits_non_zero(service, cli_env):
    poor = make_account(service, "bob", "Rev-Acc", deposit=100)
    rich = make_account(service, "bob", "Rev-Acc 2")
    cases = [
        (["transfer", poor["id"], rich["id"], "5000"], cli_env, "409 insufficient_funds"),
        (["accounts", "show", "acc_nosuch"], cli_env, "404 not_found"),
        (["transfer", poor["id"], rich["id"], "0"], cli_env, "422 validation_failed"),
        (["accounts", "list"], clean_env(ALLUSE_URL=service.url, ALLUSE_TOKEN="wrong-token"), "401 unauthorized"),
        (["status"], clean_env(ALLUSE_URL="http://127.0.0.1:9", ALLUSE_TOKEN="x"), "cannot reach"),
        (["accounts", "list"], clean_env(ALLUSE_URL=service.url, ALLUSE_DATA_DIR="/nonexistent"), "no token"),
    ]
    for args, env, expected in cases:
        result = alluse(*args, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, (args, result)
        assert len(lines) == 1 and lines[0].startswith("alluse: error: ") and expected in lines[0], (args, lines)
    usage = alluse("transfer", "only-one-argument", env=cli_env)
    assert usage.returncode == 2 and "error" in usage.stderr


def test_every_command_has_help():
    runner = CliRunner()
    commands = [[], ["serve"], ["status"], ["accounts", "list"], ["accounts", "show"], ["portfolios", "list"],
                ["portfolios", "tree"], ["transfer"], ["project"], ["tokens", "create"], ["tokens", "list"],
                ["tokens", "revoke"], ["audit", "verify"], ["backup"], ["restore"], ["doctor"], ["bench"]]
    for command in commands:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage: " in result.output, (command, result.output)
        assert len(result.output.strip().splitlines()) >= 3, (command, result.output)


def test_alluse_project_prints_the_projection_that_make_project_shows():
    result = alluse("project", "--capital", "300000", "--years", "2", env=clean_env())
    assert result.returncode == 0, result
    assert "ALL-USE projection: $300,000.00" in result.stdout and "units created" in result.stdout
    table = alluse_json("project", "--capital", "300000", "--years", "2", env=clean_env())
    assert [year["year"] for year in table["years"]] == [1, 2] and table["initial_capital"] == 300_000_00
    assert "alluse project" in (ROOT / "Makefile").read_text()
    assert "alluse serve" in (ROOT / "Makefile").read_text()


def exported_metric_names(exposition: str) -> set[str]:
    """Every family and sample name in a Prometheus text exposition."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((ROOT / "config" / "grafana" / "alluse.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 20
    names = set()
    for expression in expressions:
        names |= set(re.findall(r"\b(alluse_[a-z_]+)\b", expression))
    return names


WEBHOOK_SERIES = ("alluse_webhook_lag_seconds", "alluse_webhook_lag_events", "alluse_webhook_circuit_state",
                  "alluse_webhook_dead_letters_total")


def test_the_grafana_dashboard_queries_only_metrics_the_running_service_exports(service):
    # A webhook endpoint on a closed port (private targets are allowed in this service), so
    # that the per-endpoint webhook series have samples, not just their HELP lines.
    status, hook, _ = service.request("POST", "/v1/webhooks", token=ADMIN_TOKEN,
                                      body={"url": f"http://127.0.0.1:{free_port()}/hook"})
    assert status == 201, hook
    try:
        make_account(service, "metrics", "Rev-Acc", deposit=500)  # a commit, so request series exist
        deadline = time.monotonic() + 15
        while True:
            status, body, headers = service.request("GET", "/metrics", token=METRICS_TOKEN)
            assert status == 200 and headers["Content-Type"].startswith("text/plain"), body
            if all(f'{name}{{endpoint="{hook["id"]}"}}' in body for name in WEBHOOK_SERIES):
                break
            assert time.monotonic() < deadline, f"no samples of every webhook series for {hook['id']}: {body}"
            time.sleep(0.1)
    finally:
        assert service.request("DELETE", f"/v1/webhooks/{hook['id']}", token=ADMIN_TOKEN)[0] == 200
    exported = exported_metric_names(body)
    wanted = dashboard_metric_names()
    assert {"alluse_http_requests_total", "alluse_commit_latency_seconds_bucket", "alluse_batch_size_sum",
            "alluse_resident_actors", "alluse_actor_restarts_total", "alluse_forks_total",
            "alluse_drawdown_breaches", "alluse_webhook_delivery_seconds_bucket", *WEBHOOK_SERIES} <= wanted
    assert wanted - exported == set(), f"the dashboard queries metrics /metrics does not export: {wanted - exported}"
    rules = (ROOT / "config" / "prometheus" / "alerts.yml").read_text()
    in_rules = set(re.findall(r"\b(alluse_[a-z_]+)\b", rules))
    assert in_rules - exported == set(), f"alert rules name metrics /metrics does not export: {in_rules - exported}"


def test_metrics_need_the_metrics_token_when_one_is_set(service):
    for token in (None, "wrong", ADMIN_TOKEN):
        status, body, _ = service.request("GET", "/metrics", token=token)
        assert status == 401 and body["error"]["code"] == "unauthorized", (token, body)
    assert service.request("GET", "/metrics", token=METRICS_TOKEN)[0] == 200


def test_json_logs_carry_the_request_id_and_never_a_secret(service):
    status, created, _ = service.request("POST", "/v1/tokens", token=ADMIN_TOKEN,
                                         body={"name": "log probe", "role": "operator"})
    assert status == 201
    bogus = "alu_" + "bogus-secret-presented-by-a-stranger-0042"
    assert service.request("GET", "/v1/whoami", token=bogus)[0] == 401
    assert service.request("GET", "/v1/whoami", token=created["token"])[0] == 200
    request_id = "probe-" + uuid.uuid4().hex
    status, _, headers = service.request("GET", "/v1/accounts/acc_missing", token=ADMIN_TOKEN,
                                         headers={"X-Request-Id": request_id})
    assert status == 404 and headers["X-Request-Id"] == request_id
    service.request("GET", "/metrics", token=METRICS_TOKEN)

    def logged() -> list[dict]:
        service.stderr.flush()
        return [json.loads(line) for line in service.stderr_path.read_text().splitlines() if line.strip()]

    # The access line is written after the answer is sent: wait for it (bounded).
    deadline = time.monotonic() + 10
    while not any(line.get("request_id") == request_id for line in logged()):
        assert time.monotonic() < deadline, "no access log line with the request id"
        time.sleep(0.05)
    lines = logged()  # every line parses as JSON (json.loads above would have failed)
    probe = [line for line in lines if line.get("request_id") == request_id]
    assert probe[0]["path"] == "/v1/accounts/acc_missing" and probe[0]["status"] == 404
    assert all({"time", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    text = service.stderr_path.read_text() + service.stdout_path.read_text()
    for secret in (ADMIN_TOKEN, METRICS_TOKEN, created["token"], bogus, bogus[4:]):
        assert secret not in text, f"a secret reached the logs: {secret[:8]}…"
