"""`alluse`: one command to run and operate the engine.

Local commands act on the settings in force (config/default.toml < ALLUSE_CONFIG <
environment): `serve`, `project`, `backup`, `restore`, `doctor`, `bench`. Remote commands
talk to a running service over HTTP (`--url`, token from `--token-file`, ALLUSE_TOKEN,
ALLUSE_TOKEN_FILE or the data directory's generated admin-token). Tables by default,
`--json` for programs; any failure is one line on stderr and a non-zero exit (1: the
operation failed, 2: bad usage or configuration)."""
from __future__ import annotations

import json
import sys
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any, Optional

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from actors.settings import ConfigError, Settings, load_settings
from engine.limits import PAGE_SIZE_MAX
from ops.client import DEFAULT_URL, Client, CommandError, read_token

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
accounts_app = typer.Typer(help="Accounts: list, show.", no_args_is_help=True, rich_markup_mode=None)
portfolios_app = typer.Typer(help="Portfolios: list, tree.", no_args_is_help=True, rich_markup_mode=None)
tokens_app = typer.Typer(help="API tokens: create, list, revoke (admin).", no_args_is_help=True, rich_markup_mode=None)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(accounts_app, name="accounts")
app.add_typer(portfolios_app, name="portfolios")
app.add_typer(tokens_app, name="tokens")
app.add_typer(audit_app, name="audit")

# Piped output is not wrapped at 80 columns (ids would break across lines).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
LIST_ITEMS_MAX = 10_000


class Options(msgspec.Struct):
    url: str
    token_file: Optional[str]
    ca_file: Optional[str]
    json: bool


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as error:
        raise CommandError(f"configuration error: {error}", exit_code=2) from error


def _options(context: typer.Context) -> Options:
    return context.find_root().obj


def _client(context: typer.Context) -> Client:
    options = _options(context)
    token = read_token(options.token_file, _settings().database.data_dir)
    return Client(options.url, token, ca_file=options.ca_file)


def _money(cents: int | None) -> str:
    return "" if cents is None else f"${cents / 100:,.2f}"


def _emit(context: typer.Context, value: Any, table: Table | str | None) -> None:
    if _options(context).json:
        sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    elif table is not None:
        console.print(table)


def _emit_list(context: typer.Context, page: dict, table: Table) -> None:
    """A list is the API's page object with --json; a table says when the API has more
    (a list never ends silently at its --limit)."""
    _emit(context, page, table)
    if page["next_cursor"] and not _options(context).json:
        console.print(f"more: --cursor {page['next_cursor']}")


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        numeric = column in ("balance", "deployable", "amount", "total value", "income", "balance after")
        table.add_column(column, justify="right" if numeric else "left",
                         no_wrap=column in ("id", "portfolio", "parent", "leg", "account"))
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    return table


@app.callback()
def root(context: typer.Context,
         url: str = typer.Option(DEFAULT_URL, "--url", envvar="ALLUSE_URL", help="The service's base URL."),
         token_file: Optional[str] = typer.Option(None, "--token-file", help="File holding the bearer token "
                                                  "(else ALLUSE_TOKEN, ALLUSE_TOKEN_FILE, <data_dir>/admin-token)."),
         ca_file: Optional[str] = typer.Option(None, "--ca-file", help="CA bundle for an https:// --url."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    context.obj = Options(url=url, token_file=token_file, ca_file=ca_file, json=as_json)


# -- local commands ----------------------------------------------------------------------
@app.command()
def serve() -> None:
    """Run the service (the HTTP API and the engine; the embedded PostgreSQL unless
    DATABASE_URL is set). This is what `make run` starts."""
    from gateway.__main__ import main as serve_main

    raise typer.Exit(serve_main())


@app.command()
def project(context: typer.Context,
            capital: float = typer.Option(300_000.0, help="Initial capital in dollars."),
            years: int = typer.Option(10, min=1, max=50),
            rates: str = typer.Option("150,100,50", help="Weekly return in bps: generation,revenue,compounding."),
            start: Optional[str] = typer.Option(None, help="Start date (ISO); default today.")) -> None:
    """The projection table: a portfolio simulated week by week with the live rules
    (thresholds from the configuration). Computed here; no service needed."""
    from engine.projection import project as run_projection

    try:
        generation, revenue, compounding = (int(value) for value in rates.split(","))
        started_on = date.fromisoformat(start) if start else date.today()
    except ValueError as error:
        raise CommandError(f"--rates must be three integers and --start an ISO date ({error})", 2) from error
    if not 0 < capital <= 10**13:
        raise CommandError("--capital must be positive (at most 10^13 dollars)", 2)
    rules = _settings().rules
    clock = time.perf_counter()
    result = run_projection(initial_capital=round(capital * 100), weeks=52 * years,
                            weekly_return_bps={"generation": generation, "revenue": revenue,
                                               "compounding": compounding}, start=started_on, rules=rules)
    elapsed_ms = (time.perf_counter() - clock) * 1000
    title = (f"ALL-USE projection: {_money(result.initial_capital)} at {generation}/{revenue}/{compounding} bps "
             f"weekly (Gen/Rev/Com), {years} years, fork at +{_money(rules.fork_threshold_cents)}, "
             f"merge at {_money(rules.merge_threshold_cents)}")
    table = _table(title, ["year", "total value", "income", "forks", "merges", "active units"],
                   [[y.year, _money(y.total_value), _money(y.income), y.forks, y.merges, y.active_units]
                    for y in result.years])
    table.caption = (f"units created {result.units_created}, merged {result.units_merged}; "
                     f"computed in {elapsed_ms:.0f} ms")
    _emit(context, msgspec.to_builtins(msgspec.structs.replace(result, weeks=[])), table)


@app.command()
def backup(context: typer.Context,
           directory: Optional[Path] = typer.Argument(None, help="A new directory for the backup (default: a "
                                                      "dated one under database.backup_dir).")) -> None:
    """An online backup of the database in force: pg_basebackup of the embedded server,
    or pg_dump of DATABASE_URL; with a checksummed manifest."""
    from persistence import backup as backups

    settings = _settings()
    database = settings.database
    if directory is None:
        if not database.backup_dir:
            raise CommandError("give a directory or set database.backup_dir (ALLUSE_BACKUP_DIR)", 2)
        directory = Path(database.backup_dir).expanduser() / backups.default_backup_name()
    try:
        if database.url:
            manifest = backups.backup_url(database.url, directory)
        else:
            manifest = backups.backup_embedded(database.data_dir, directory, wal_archive_dir=database.wal_archive_dir,
                                               archive_timeout_s=database.archive_timeout_s)
    except backups.BackupError as error:
        raise CommandError(str(error)) from error
    head = manifest["audit_head"]
    _emit(context, {"directory": str(directory), **manifest},
          _table(f"backup written to {directory}", ["field", "value"],
                 [["kind", manifest["kind"]], ["started", manifest["started_at"]],
                  ["finished", manifest["finished_at"]], ["server", manifest["server_version"]],
                  ["last commit (audit seq)", manifest["audit_seq"]], ["last event seq", manifest["event_seq"]],
                  ["audit chain head", f"{head['seq']} {head['hash'][:16]}…"],
                  ["payload sha256", manifest["payload_sha256"]]]))


@app.command()
def restore(context: typer.Context,
            directory: Path = typer.Argument(..., help="A backup directory (made by `alluse backup`)."),
            until: Optional[str] = typer.Option(None, help="Recover to this time, e.g. '2026-12-02 14:00:00+00' "
                                                "(needs the WAL archive)."),
            wal_archive: Optional[str] = typer.Option(None, help="WAL archive to replay (default: "
                                                      "database.wal_archive_dir).")) -> None:
    """Restore a backup into the database in force: a NEW embedded data directory
    (ALLUSE_DATA_DIR), or an empty DATABASE_URL database for a pg_dump backup. Without
    --until, to the end of the WAL archive (if any) or of the backup."""
    from persistence import backup as backups

    database = _settings().database
    target_time = _parse_time(until) if until else None
    try:
        manifest = backups.verify(directory)
        if database.url:
            if target_time is not None:
                raise CommandError("--until needs an embedded server's base backup and WAL archive", 2)
            result = backups.restore_dump(directory, database.url)
        elif manifest["kind"] == "pg_dump":
            if target_time is not None:
                raise CommandError("--until is not possible with a pg_dump backup", 2)
            result = backups.restore_dump_embedded(directory, database.data_dir)
        else:
            result = backups.restore_embedded(directory, database.data_dir,
                                              wal_archive_dir=wal_archive or database.wal_archive_dir,
                                              until=target_time, archive_timeout_s=database.archive_timeout_s)
    except backups.BackupError as error:
        raise CommandError(str(error)) from error
    restored, head = result["restored"], result["restored"]["audit_head"]
    _emit(context, result, _table(f"restored {directory} into {database.url and 'DATABASE_URL' or database.data_dir}",
                                  ["field", "value"],
                                  [["backup taken", manifest["finished_at"]],
                                   ["recovered to", str(target_time or "end of backup/archive")],
                                   ["last commit (audit seq)", restored["audit_seq"]],
                                   ["last event seq", restored["event_seq"]],
                                   ["audit chain head", f"{head['seq']} {head['hash'][:16]}…"]]))


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as error:
        raise CommandError(f"--until {text!r} is not a time like '2026-12-02 14:00:00+00'", 2) from error
    if moment.tzinfo is None:
        raise CommandError(f"--until {text!r} needs a time zone offset (e.g. +00)", 2)
    return moment


@app.command()
def doctor(context: typer.Context) -> None:
    """Production-readiness checks, each pass / warn / fail with a reason; exit 1 on any fail."""
    from ops.doctor import FAIL, as_dicts, run_checks

    checks = run_checks(_settings())
    styles = {"pass": "[green]pass[/]", "warn": "[yellow]warn[/]", "fail": "[red]fail[/]"}
    table = Table(title="alluse doctor", title_justify="left")
    for column in ("check", "status", "reason"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, styles[check.status], check.reason)
    _emit(context, as_dicts(checks), table)
    failed = [check.name for check in checks if check.status == FAIL]
    if failed:
        raise CommandError(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(context: typer.Context) -> None:
    """Run the performance harness (perf.bench; default --quick). Extra arguments go to it."""
    try:
        from perf.bench import main as bench_main
    except ImportError as error:
        raise CommandError(f"the benchmark needs the bench extra ({error.name}): pip install -e '.[bench]' "
                           "(make bench does)") from error
    raise typer.Exit(bench_main(list(context.args) or ["--quick"]))


# -- remote commands ---------------------------------------------------------------------
@app.command()
def status(context: typer.Context) -> None:
    """Health, readiness, the writer and the supervision tree of a running service."""
    client = _client(context)
    health = client.request("GET", "/health", authenticated=False)
    try:
        client.request("GET", "/ready", authenticated=False)
        ready = "ready"
    except CommandError as error:
        ready = f"not ready ({error.message})"
    tree = client.get("/v1/supervisor/status")
    value = {"health": health, "ready": ready, "supervisor": tree}
    rows = [["health", health.get("status") if isinstance(health, dict) else health], ["ready", ready],
            ["database healthy", tree.get("database_healthy")],
            ["operations in flight", tree.get("operations_in_flight")],
            ["write queue depth", tree.get("write_queue_depth")],
            ["resident accounts", f"{tree.get('resident_accounts')} of {tree.get('resident_accounts_max')}"],
            ["supervisors", tree.get("supervisors_total")], ["restarts", tree.get("restarts_total")],
            ["quarantined", len(tree.get("quarantined") or {})],
            ["mailbox depth max", tree.get("mailbox_depth_max")]]
    _emit(context, value, _table(f"status of {client.url}", ["", "value"], rows))


ACCOUNT_COLUMNS = ["id", "name", "type", "status", "owner", "portfolio", "balance"]


def _account_row(account: dict) -> list:
    return [account["id"], account["name"], account["type"], account["status"], account["owner"],
            account.get("portfolio_id"), _money(account["balance"])]


@accounts_app.command("list")
def accounts_list(context: typer.Context, owner: Optional[str] = None, type: Optional[str] = None,
                  status: Optional[str] = None, portfolio: Optional[str] = None,
                  limit: int = typer.Option(100, min=1, max=LIST_ITEMS_MAX, help="Most accounts shown."),
                  cursor: Optional[str] = typer.Option(None, help="Continue after an earlier list's last account "
                                                       "(its `more: --cursor`).")) -> None:
    """Accounts, filtered by owner, type, status or portfolio."""
    page = _client(context).pages("/v1/accounts", limit_total=limit, page_max=PAGE_SIZE_MAX, cursor=cursor,
                                  owner=owner, type=type, status=status, portfolio_id=portfolio)
    items = page["items"]
    _emit_list(context, page, _table(f"{len(items)} accounts", ACCOUNT_COLUMNS, [_account_row(a) for a in items]))


@accounts_app.command("show")
def accounts_show(context: typer.Context, account_id: str) -> None:
    """One account with its latest transactions."""
    client = _client(context)
    account = client.get(f"/v1/accounts/{account_id}")
    transactions = client.get(f"/v1/accounts/{account_id}/transactions", limit=10)["items"]
    fields = [[key, _money(value) if key in ("balance", "deployable", "baseline") else value]
              for key, value in account.items() if key != "allocations"]
    fields.append(["allocations", f"contracts {_money(account['allocations'].get('contracts'))}, "
                                  f"leaps {_money(account['allocations'].get('leaps'))}"])
    if not _options(context).json:
        console.print(_table(f"account {account_id}", ["field", "value"], fields))
        console.print(_table("latest transactions", ["id", "kind", "direction", "amount", "balance after", "at"],
                             [[t["id"], t["kind"], t["direction"], _money(t["amount"]), _money(t["balance_after"]),
                               t["created_at"]] for t in transactions]))
    _emit(context, {"account": account, "transactions": transactions}, None)


@portfolios_app.command("list")
def portfolios_list(context: typer.Context, owner: Optional[str] = None,
                    limit: int = typer.Option(100, min=1, max=LIST_ITEMS_MAX, help="Most portfolios shown."),
                    cursor: Optional[str] = typer.Option(None, help="Continue after an earlier list's last "
                                                         "portfolio (its `more: --cursor`).")) -> None:
    """Root portfolios, each with the totals of its whole fork tree and its active units."""
    page = _client(context).pages("/v1/portfolios", limit_total=limit, page_max=PAGE_SIZE_MAX, cursor=cursor,
                                  owner=owner)
    items = page["items"]
    rows = [[p["id"], p["name"], p["owner"], p["status"], p["opened_on"], p["units_active"],
             _money(p["totals"]["balance"]), _money(p["totals"]["deployable"])] for p in items]
    _emit_list(context, page, _table(f"{len(items)} portfolios", ["id", "name", "owner", "status", "opened",
                                                                  "active units", "balance", "deployable"], rows))


@portfolios_app.command("tree")
def portfolios_tree(context: typer.Context, portfolio_id: str) -> None:
    """The fork tree below a portfolio."""
    tree = _client(context).get(f"/v1/portfolios/{portfolio_id}/tree")
    nodes = tree["nodes"]
    rows = [[n["id"], n["parent_id"], n["depth"], n["status"], _money(n["balance"])] for n in nodes]
    _emit(context, tree, _table(f"fork tree of {portfolio_id}", ["id", "parent", "depth", "status", "balance"], rows))


@app.command()
def transfer(context: typer.Context, from_account: str, to_account: str,
             amount: int = typer.Argument(..., help="Amount in cents."),
             memo: Optional[str] = None,
             idempotency_key: Optional[str] = typer.Option(None, help="Reuse to retry safely (default: a new UUID).")
             ) -> None:
    """Move money between two accounts (both legs in one commit)."""
    body = {"from_account": from_account, "to_account": to_account, "amount": amount}
    if memo:
        body["memo"] = memo
    result = _client(context).request("POST", "/v1/transfers", body, idempotency_key=idempotency_key)
    _emit(context, result, _table(f"transfer {result['id']}", ["leg", "account", "direction", "amount",
                                                               "balance after"],
                                  [[leg["id"], leg["account_id"], leg["direction"], _money(leg["amount"]),
                                    _money(leg["balance_after"])] for leg in result["legs"]]))


TOKEN_COLUMNS = ["id", "name", "role", "owner", "created", "revoked"]


def _token_row(token: dict) -> list:
    return [token["id"], token["name"], token["role"], token.get("owner"), token.get("created_at"),
            token.get("revoked_at")]


@tokens_app.command("create")
def tokens_create(context: typer.Context, name: str,
                  role: str = typer.Option(..., help="admin, operator, strategy or viewer."),
                  owner: Optional[str] = typer.Option(None, help="Scope the token to one owner's data.")) -> None:
    """Create a token; its secret is printed once, here."""
    body = {"name": name, "role": role}
    if owner:
        body["owner"] = owner
    created = _client(context).request("POST", "/v1/tokens", body)
    _emit(context, created, _table(f"token {created['id']} (the secret is shown only now)", ["field", "value"],
                                   [[key, value] for key, value in created.items()]))


@tokens_app.command("list")
def tokens_list(context: typer.Context) -> None:
    """Every token (never their secrets)."""
    items = _client(context).get("/v1/tokens")["items"]
    _emit(context, items, _table(f"{len(items)} tokens", TOKEN_COLUMNS, [_token_row(t) for t in items]))


@tokens_app.command("revoke")
def tokens_revoke(context: typer.Context, token_id: str) -> None:
    """Revoke a token; it fails at once."""
    revoked = _client(context).request("DELETE", f"/v1/tokens/{token_id}")
    _emit(context, revoked, _table("revoked", TOKEN_COLUMNS, [_token_row(revoked)]))


@audit_app.command("verify")
def audit_verify(context: typer.Context) -> None:
    """Recompute the audit log's hash chain; exit 1 if it is broken."""
    result = _client(context).get("/v1/audit/verify")
    _emit(context, result, _table("audit chain", ["field", "value"], [[k, v] for k, v in result.items()]))
    if not result.get("valid"):
        raise CommandError(f"audit chain broken at record {result.get('first_bad_record')}: {result.get('reason')}")


def main(argv: list[str] | None = None) -> int:
    """The console script: one error line on stderr and a non-zero exit on failure."""
    try:
        result = app(args=argv, prog_name="alluse", standalone_mode=False)
    except CommandError as error:
        print(f"alluse: error: {error.message}", file=sys.stderr)
        return error.exit_code
    except typer.Exit as done:
        return done.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("alluse: aborted", file=sys.stderr)
        return 130
    except Exception as error:  # click's usage errors carry their own exit code
        exit_code = getattr(error, "exit_code", None)
        if exit_code is not None and hasattr(error, "format_message"):
            if type(error).__name__ == "NoArgsIsHelpError":  # a bare `alluse` or group: its help
                print(error.format_message())
            else:
                print(f"alluse: error: {error.format_message()}", file=sys.stderr)
            return exit_code
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
