"""The VPC lab: an isolated stand-in for EC2, IMDS and the VPC data plane (ARCHITECTURE §8).

A lab called NAME ('avc' + up to 12 of [a-z0-9]; default 'avclab') is a set of network namespaces:

    NAME-ctl     the lab daemon (vpclab.daemon): moto server on 127.0.0.1:5000, the EC2 front, every
                 node's IMDS, the echo servers, the data-plane loop; no interface but lo
    NAME-rtr     the VPC router: one veth per attached ENI (n<K>d<D>), one per external host (to-<host>)
    NAME-nodeK   node K: eth<D> per attached ENI with the ENI's MAC; 169.254.169.254 (IMDS) and
                 169.254.169.200 (EC2 front) on lo, served by the daemon through sockets it opened
                 inside the node's namespace
    NAME-inet    the internet host 203.0.113.10, echo on TCP and UDP 7007
    NAME-xN      extra hosts (given CIDRs, at network + 10), echo on 7007

Nothing has a link into the root namespace. State lives in /run/vpclab/NAME/ (config, daemon pid,
control socket, log). Entry points: vpclab.api.Lab (Python), `vpclab` (vpclab.cli), and the probes
in vpclab.probe (ping, echo, UDP, IMDS) to run inside namespaces.

EC2 as the nodes see it is moto behind the lab's front (vpclab.ec2front), which adds what EC2 does and
moto does not: per-instance-type ENI and IPv4-slot limits, subnet exhaustion, IPv4 prefixes (aligned
/28s, Nitro types only, InsufficientCidrBlocks in a fragmented subnet: vpclab.ec2rules), request
throttling with EC2's token buckets (vpclab.throttling) and per-action latency (vpclab.latency), the
last two off unless asked for (Lab.up(ec2_throttling=, ec2_latency=), Lab.set_ec2_timing, `vpclab
timing`). IMDS (vpclab.imds) and the data plane (vpclab.dataplane) follow EC2's state, prefixes included.
"""
