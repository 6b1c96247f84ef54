"""Bounded queues answer 'overloaded' at once instead of growing; configuration layers
defaults < ALLUSE_CONFIG file < environment, and refuses unknown keys."""
import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from actors.api import Engine
from actors.settings import ConfigError, load_settings
from engine.errors import Overloaded
from gateway.app import create_app
from tests.conftest import engine_settings


async def test_operations_beyond_the_in_flight_bound_are_refused_quickly_and_change_nothing(database_url):
    async with Engine(engine_settings(database_url, operations_in_flight_max=4)) as engine:
        account = await engine.create_account(name="a", type="revenue", owner="o")
        started = time.perf_counter()
        outcomes = await asyncio.gather(*[engine.deposit(account.id, 1) for _ in range(200)],
                                        return_exceptions=True)
        elapsed = time.perf_counter() - started
        acknowledged = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, Overloaded)]
        assert len(acknowledged) + len(refused) == 200, [o for o in outcomes if isinstance(o, Exception)
                                                         and not isinstance(o, Overloaded)]
        assert refused and acknowledged
        assert elapsed < 5.0
        assert (await engine.get_account(account.id)).balance == len(acknowledged)
        rows = await engine.store.fetch("SELECT count(*) AS n FROM entries WHERE account_id = $1", account.id)
        assert rows[0]["n"] == len(acknowledged)


async def test_a_hot_account_beyond_its_own_bound_is_refused_while_others_proceed(database_url):
    async with Engine(engine_settings(database_url, account_operations_in_flight_max=2)) as engine:
        hot = await engine.create_account(name="hot", type="revenue", owner="o")
        cold = await engine.create_account(name="cold", type="revenue", owner="o")
        outcomes = await asyncio.gather(*[engine.deposit(hot.id, 1) for _ in range(50)],
                                        engine.deposit(cold.id, 7), return_exceptions=True)
        assert any(isinstance(o, Overloaded) for o in outcomes[:50])
        assert not isinstance(outcomes[50], BaseException)
        acknowledged = sum(1 for o in outcomes[:50] if not isinstance(o, BaseException))
        assert (await engine.get_account(hot.id)).balance == acknowledged


async def test_overload_over_http_is_a_503_with_retry_after(database_url):
    settings = load_settings({}, {"database": {"url": database_url}, "server": {"admin_token": "t0ken-for-tests"},
                                  "engine": {"operations_in_flight_max": 2}})
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": "Bearer t0ken-for-tests"}
        created = await client.post("/v1/accounts", json={"name": "a", "type": "revenue", "owner": "o"},
                                    headers=headers)
        account = await created.json()
        replies = await asyncio.gather(*[client.post(f"/v1/accounts/{account['id']}/deposits", json={"amount": 1},
                                                     headers=headers) for _ in range(60)])
        statuses = [r.status for r in replies]
        assert set(statuses) <= {201, 503} and 503 in statuses
        refused = next(r for r in replies if r.status == 503)
        body = await refused.json()
        assert body["error"]["code"] == "overloaded" and refused.headers["Retry-After"]
        balance = (await (await client.get(f"/v1/accounts/{account['id']}", headers=headers)).json())["balance"]
        assert balance == statuses.count(201)


def test_an_unknown_configuration_key_is_an_error_that_names_it(tmp_path):
    config = tmp_path / "alluse.toml"
    config.write_text("[engine]\nbatch_size_maximum = 10\n")
    with pytest.raises(ConfigError, match="batch_size_maximum"):
        load_settings({"ALLUSE_CONFIG": str(config)})


def test_the_environment_overrides_the_file_which_overrides_the_defaults(tmp_path):
    config = tmp_path / "alluse.toml"
    config.write_text('[server]\nport = 9001\nhost = "0.0.0.0"\n[rules]\nfork_threshold_cents = 123\n')
    settings = load_settings({"ALLUSE_CONFIG": str(config), "ALLUSE_PORT": "9002"})
    assert settings.server.port == 9002
    assert settings.server.host == "0.0.0.0"
    assert settings.rules.fork_threshold_cents == 123
    assert settings.rules.merge_threshold_cents == 500_000_00
    assert load_settings({}).server.port == 8080


@pytest.mark.parametrize("environ, fragment", [
    ({"ALLUSE_PORT": "eighty"}, "ALLUSE_PORT"),
    ({"ALLUSE_PORT": "70000"}, "port"),
    ({"ALLUSE_CONFIG": "/nonexistent/alluse.toml"}, "cannot read"),
])
def test_bad_configuration_values_are_errors_with_a_clear_message(environ, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(environ)
