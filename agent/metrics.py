"""The agent's Prometheus metrics (prometheus_client), under upstream's names, types and labels
(utils/prometheusmetrics/prometheusmetrics.go in aws/amazon-vpc-cni-k8s) for every concept both
have, and ours under `aws_vpc_cni_py_*`.

The figures are read from the agent's status at each scrape (a custom collector), so a scrape shows
the pool as the store holds it now. prometheus_client writes a counter `x` as `x_total` (its parser
reads the family back as `x`); gauges and summaries keep upstream's names exactly.
"""

from __future__ import annotations

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

# upstream's names, types and labels
ENI_ALLOCATED = "awscni_eni_allocated"
ENI_MAX = "awscni_eni_max"
IP_MAX = "awscni_ip_max"
TOTAL_IPS = "awscni_total_ip_addresses"
ASSIGNED_IPS = "awscni_assigned_ip_addresses"
ASSIGNED_PER_ENI = "awscni_assigned_ip_per_eni"
TOTAL_PREFIXES = "awscni_total_ipv4_prefixes"
EC2_REQUESTS = "awscni_ec2api_req_count"
EC2_ERRORS = "awscni_ec2api_error_count"
API_ERRORS = "awscni_aws_api_error_count"
API_LATENCY = "awscni_aws_api_latency_ms"
IN_PROGRESS = "awscni_ipamd_action_inprogress"
IPAMD_ERRORS = "awscni_ipamd_error_count"
# ours
OURS = "aws_vpc_cni_py_"


class StatusCollector:
    """Metric families from `status()` (Agent.status) at each collection."""

    def __init__(self, status):
        self.status = status

    def collect(self):
        status = self.status()
        enis = status["enis"]
        figures = status.get("figures")
        yield _gauge(ENI_ALLOCATED, "The number of ENIs allocated", len(enis))
        if figures:
            yield _gauge(ENI_MAX, "The maximum number of ENIs that can be attached to the instance, accounting "
                                  "for unmanaged ENIs", figures["max_enis"])
            yield _gauge(IP_MAX, "The maximum number of IP addresses that can be allocated to the instance",
                         figures["max_enis"] * figures["ips_per_eni"])
        yield _gauge(TOTAL_IPS, "The total number of IP addresses", sum(e["total"] for e in enis))
        yield _gauge(ASSIGNED_IPS, "The number of IP addresses assigned to pods", sum(e["assigned"] for e in enis))
        yield _gauge(TOTAL_PREFIXES, "The total number of IPv4 prefixes", sum(e.get("prefixes", 0) for e in enis))
        yield _per_eni(ASSIGNED_PER_ENI, "The number of allocated ips partitioned by eni", enis, "assigned")
        requests = CounterMetricFamily(EC2_REQUESTS, "The number of requests made to EC2 APIs by CNI", labels=["fn"])
        for action, count in sorted(status.get("ec2_calls", {}).items()):
            requests.add_metric([action], count)
        yield requests
        failed = CounterMetricFamily(EC2_ERRORS, "The number of errors encountered in EC2 API calls", labels=["fn"])
        by_code = CounterMetricFamily(API_ERRORS, "The number of times AWS API returns an error", labels=["api", "error"])
        per_action: dict[str, int] = {}
        for action, code, count in status.get("ec2_errors", []):
            by_code.add_metric([action, code], count)
            per_action[action] = per_action.get(action, 0) + count
        for action, count in sorted(per_action.items()):
            failed.add_metric([action], count)
        yield failed
        yield by_code
        latency = SummaryMetricFamily(API_LATENCY, "AWS API call latency in ms", labels=["api", "error", "status"])
        for action, error, http_status, count, total_ms in status.get("ec2_latency", []):
            latency.add_metric([action, error, http_status], count_value=count, sum_value=total_ms)
        yield latency
        in_progress = GaugeMetricFamily(IN_PROGRESS, "The number of ipamd actions in progress", labels=["fn"])
        for action, count in sorted(status.get("in_progress", {}).items()):
            in_progress.add_metric([action], count)
        yield in_progress
        errors = CounterMetricFamily(IPAMD_ERRORS, "The number of errors encountered in ipamd", labels=["fn"])
        for action, count in sorted(status.get("errors", {}).items()):
            errors.add_metric([action], count)
        yield errors
        # ours
        yield _per_eni(OURS + "eni_ip_addresses", "Secondary IPs per ENI", enis, "total")
        yield _per_eni(OURS + "eni_cooling_ip_addresses", "IPs per ENI still in their cool-down", enis, "cooling")
        yield _per_eni(OURS + "eni_free_ip_addresses", "IPs per ENI that can be handed out now", enis, "free")
        if figures:
            yield _gauge(OURS + "pool_short", "IPs the pool lacks to meet its target", figures["short"])
            yield _gauge(OURS + "pool_over", "IPs the pool holds beyond its target", figures["over"])
        yield _gauge(OURS + "pool_blocked", "1 while the pool is short and cannot grow", int(bool(status.get("blocked"))))
        yield CounterMetricFamily(OURS + "agent_ticks", "Pool checks the agent has completed", value=status["ticks"])


def _gauge(name: str, help_text: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _per_eni(name: str, help_text: str, enis: list[dict], field: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["eni"])
    for eni in enis:
        family.add_metric([eni["eni_id"]], eni[field])
    return family


def registry(status) -> CollectorRegistry:
    """A registry of the agent's metrics, read from `status()` at each scrape."""
    from prometheus_client import ProcessCollector
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(status))
    ProcessCollector(registry=reg)
    return reg


def serve(status, host: str, port: int):
    """Serve /metrics on host:port in a daemon thread; returns the server."""
    from prometheus_client import start_http_server
    server, _ = start_http_server(port, addr=host, registry=registry(status))
    return server
