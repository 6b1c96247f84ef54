"""The operations files as their own tools check them: the alert rules with promtool
(syntax and unit tests on synthetic series), every alert's runbook section, the
Prometheus scrape examples, the systemd unit with systemd-analyze, the Nginx example with
`nginx -t` and a generated certificate, the container recipe and the compose file as
files. `.ci/run` installs promtool and nginx; systemd-analyze comes with Debian."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "config" / "prometheus"
DEPLOY = ROOT / "deploy"
TOOL_TIMEOUT_S = 60


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: `.ci/run` installs it (apt-get install prometheus nginx)")
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=cwd, check=False)


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests():
    checked = run(tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0 and "SUCCESS: 17 rules found" in checked.stdout, checked
    tested = run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_promtool_test_rules_fails_when_an_alert_does_not_fire_as_expected(tmp_path):
    """The unit tests can fail: with one threshold loosened, they do."""
    shutil.copy(PROMETHEUS / "alerts.test.yml", tmp_path / "alerts.test.yml")
    rules = (PROMETHEUS / "alerts.yml").read_text().replace("alluse_quarantined_accounts > 0",
                                                            "alluse_quarantined_accounts > 5")
    (tmp_path / "alerts.yml").write_text(rules)
    tested = run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert tested.returncode != 0 and "AllUseAccountsQuarantined" in tested.stdout + tested.stderr


def test_every_alert_links_a_runbook_section_of_the_operations_guide():
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    tested = (PROMETHEUS / "alerts.test.yml").read_text()
    guide = (ROOT / "docs" / "operations.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in guide.splitlines() if line.startswith("#")}
    for alert in alerts:
        link = alert["annotations"]["runbook_url"]
        assert link.startswith("docs/operations.md#"), alert["alert"]
        assert link.split("#", 1)[1] in anchors, f"{alert['alert']}: no section {link} in docs/operations.md"
        assert f"alertname: {alert['alert']}" in tested, f"{alert['alert']} has no promtool unit test"
        assert alert["labels"]["severity"] in ("critical", "warning", "info")


def test_the_prometheus_scrape_examples_are_valid_configurations(tmp_path):
    checked = run(tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The compose file mounts alerts.yml next to its own prometheus.yml.
    shutil.copy(DEPLOY / "container" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    checked = run(tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_grafana_dashboard_is_a_dashboard_with_a_query_in_every_panel():
    dashboard = json.loads((ROOT / "config" / "grafana" / "alluse.json").read_text())
    assert dashboard["uid"] == "alluse-engine" and dashboard["panels"]
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for subject in ("requests", "latency", "batch", "commit", "resident", "restarts", "forks", "drawdown",
                    "webhook lag", "circuits", "dead letters"):
        assert subject in titles, subject
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """Verified as shipped but for the install location, pointed at this checkout's
    console script (systemd-analyze checks that ExecStart exists)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    alluse = Path(shutil.which("alluse") or ROOT / ".venv" / "bin" / "alluse").resolve()
    unit = (DEPLOY / "systemd" / "alluse@.service").read_text()
    assert "ExecStart=/opt/alluse/.venv/bin/alluse serve" in unit
    unit = unit.replace("/opt/alluse/.venv/bin/alluse", str(alluse))
    (tmp_path / "alluse@.service").write_text(unit)
    result = run(analyze, "verify", str(tmp_path / "alluse@8081.service"), cwd=tmp_path)
    # Missing files of this machine (no /etc/alluse here) are not the unit's fault.
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "alluse.env" not in line and "Failed to prepare filename" not in line]
    assert result.returncode == 0 or not problems, result.stdout + result.stderr
    broken = unit.replace("[Service]", "[Service]\nNoSuchDirective=yes")
    (tmp_path / "alluse@.service").write_text(broken)
    result = run(analyze, "verify", str(tmp_path / "alluse@8081.service"), cwd=tmp_path)
    assert "NoSuchDirective" in result.stdout + result.stderr, "systemd-analyze would have caught a bad unit"


def test_the_nginx_example_passes_nginx_t_with_a_generated_certificate(tmp_path):
    nginx = tool("nginx")
    ca = trustme.CA()
    certificate = ca.issue_cert("alluse.example.com")
    chain, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in certificate.cert_chain_pems))
    certificate.private_key_pem.write_to_path(str(key))
    site = (DEPLOY / "nginx" / "alluse.conf").read_text()
    site = site.replace("/etc/alluse/tls/fullchain.pem", str(chain)).replace("/etc/alluse/tls/privkey.pem", str(key))
    site = site.replace("/var/log/nginx/alluse.access.log", str(tmp_path / "access.log"))
    (tmp_path / "alluse.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n    include {tmp_path}/alluse.conf;\n}}\n")
    result = run(nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"))
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr
    for directive in ("client_max_body_size", "proxy_read_timeout", "X-Forwarded-For", "X-Forwarded-Proto",
                      "ssl_protocols"):
        assert directive in site


def test_the_container_recipe_and_compose_file_reference_what_exists():
    recipe = (DEPLOY / "container" / "Containerfile").read_text()
    instructions = [line.split()[0] for line in recipe.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0] == "FROM" and "USER" in instructions and "HEALTHCHECK" in instructions
    for source in re.findall(r"^COPY (.+?) \S+$", recipe, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"Containerfile copies {path}, which does not exist"
    assert 'CMD ["/opt/alluse/.venv/bin/alluse", "serve"]' in recipe

    compose = yaml.safe_load((DEPLOY / "container" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"engine", "postgres", "prometheus", "grafana"}
    assert services["engine"]["build"]["dockerfile"] == "deploy/container/Containerfile"
    assert (DEPLOY / "container" / services["engine"]["build"]["context"] / "pyproject.toml").exists()
    assert "@postgres:5432/" in services["engine"]["environment"]["DATABASE_URL"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / "container" / source).exists(), f"compose mounts {source}, which does not exist"
