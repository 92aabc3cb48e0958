"""The leaked-ENI sweep that can never touch what is not ours (issue #16 point 4).

An ENI is deleted only if every one of these holds, checked on EC2's answer (the filters narrow the
request; the checks here decide):
- it is detached (status "available", no attachment);
- it is in this node's VPC;
- it carries our cluster's tag, cluster.k8s.amazonaws.com/name = CLUSTER_NAME (no CLUSTER_NAME: no
  sweep at all, said once in the log: an untagged cluster cannot tell its ENIs from another's);
- we created it: our instance tag, our createdAt tag and our description prefix (aws-K8S-);
- it was created more than MIN_AGE ago (an ENI being created and attached is seconds old).
A node sweeps at most once per SWEEP_INTERVAL, the first time at a random point of the first
interval, the next ones jittered, so a cluster's nodes never sweep together. One failed delete does
not stop the others; an ENI attached meanwhile is refused by EC2 (InUse) and skipped.

Upstream (aws/amazon-vpc-cni-k8s pkg/awsutils/awsutils.go): cleanUpLeakedENIs runs hourly after a
random start-up delay of up to eniCleanupStartupDelayMax (300 s), filters on tag-key
node.k8s.amazonaws.com/instance_id, status available, vpc-id, and the cluster tag when set, and
deletes ENIs older than eniDeleteCooldownTime (5 min). This sweep also refuses to run without a
cluster name and waits an hour, not five minutes.
"""

from __future__ import annotations

import random
import time
from typing import Callable

from .ec2 import (DESCRIBE_PAGE_SIZE, ENI_BUSY_CODES, ENI_DESCRIPTION_PREFIX, ENI_NOT_FOUND, TAG_CLUSTER_NAME, TAG_CREATED_AT,
                  TAG_INSTANCE_ID, EC2Error, _parse_rfc3339)

SWEEP_INTERVAL = 3600.0  # s between two sweeps of one node
SWEEP_JITTER = 0.2       # each later interval is drawn in [1 - j, 1 + j] times SWEEP_INTERVAL
MIN_AGE = 3600.0         # s: a detached ENI of ours younger than this is left alone


class LeakSweep:
    """One node's sweep. `ec2` is a cnicore.ec2.EC2 (its retries, counts and error classes)."""

    def __init__(self, ec2, vpc_id: str, cluster_name: str, log, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, interval: float = SWEEP_INTERVAL, jitter: float = SWEEP_JITTER,
                 min_age: float = MIN_AGE):
        if not vpc_id.startswith("vpc-"):
            raise ValueError(f"not a VPC ID: {vpc_id!r}")
        self.ec2, self.vpc_id, self.cluster_name, self.log = ec2, vpc_id, cluster_name, log
        self._clock = clock
        self._rng = rng or random.Random()
        self.interval, self.jitter, self.min_age = interval, jitter, min_age
        self._next = clock() + self._rng.uniform(0, interval)
        self._said_disabled = False

    def due(self) -> bool:
        return self._clock() >= self._next

    @property
    def enabled(self) -> bool:
        """Whether a sweep lists ENIs: without the cluster's name ours cannot be told from another's."""
        return bool(self.cluster_name)

    def maybe_run(self) -> list[str]:
        """Sweep if due; return the IDs deleted."""
        if not self.due():
            return []
        self._next = self._clock() + self.interval * self._rng.uniform(1 - self.jitter, 1 + self.jitter)
        return self.run()

    def run(self) -> list[str]:
        """Delete the leaked ENIs now; return their IDs. Raises EC2Error if EC2 cannot list them."""
        if not self.enabled:
            if not self._said_disabled:
                self.log.warn("leaked-ENI sweep disabled: CLUSTER_NAME is not set, so ENIs of this cluster "
                              "cannot be told from another's; set CLUSTER_NAME to have leaked ENIs deleted")
                self._said_disabled = True
            return []
        deleted = []
        for eni_id in self.leaked():
            try:
                self.ec2._call("DeleteNetworkInterface", NetworkInterfaceId=eni_id)
            except EC2Error as exc:
                if exc.code != ENI_NOT_FOUND and exc.code not in ENI_BUSY_CODES:
                    self.log.warn(f"leaked ENI not deleted: {exc}", eni=eni_id)
                continue
            deleted.append(eni_id)
        if deleted:
            self.log.info("deleted leaked ENIs", enis=deleted)
        return deleted

    def leaked(self) -> list[str]:
        """IDs of the ENIs that pass every check of the module docstring (read on EC2's raw answer:
        cnicore.ec2.ENI does not carry the VPC)."""
        params = {"Filters": [{"Name": "vpc-id", "Values": [self.vpc_id]},
                              {"Name": "status", "Values": ["available"]},
                              {"Name": f"tag:{TAG_CLUSTER_NAME}", "Values": [self.cluster_name]},
                              {"Name": "tag-key", "Values": [TAG_INSTANCE_ID]}],
                  "MaxResults": DESCRIBE_PAGE_SIZE}
        found = []
        while True:
            answer = self.ec2._call("DescribeNetworkInterfaces", **params)
            found += [d["NetworkInterfaceId"] for d in answer.get("NetworkInterfaces", []) if self._leaked(d)]
            params["NextToken"] = answer.get("NextToken")
            if not params["NextToken"]:
                return found

    def _leaked(self, d: dict) -> bool:
        tags = {t["Key"]: t.get("Value", "") for t in d.get("TagSet") or []}
        created = _parse_rfc3339(tags.get(TAG_CREATED_AT, ""))
        return (d.get("Status") == "available" and not d.get("Attachment") and d.get("VpcId") == self.vpc_id
                and tags.get(TAG_CLUSTER_NAME) == self.cluster_name and TAG_INSTANCE_ID in tags
                and d.get("Description", "").startswith(ENI_DESCRIPTION_PREFIX)
                and created is not None and self._clock() - created > self.min_age)
