"""The frozen bundle's one entry point: dispatch on the program name, busybox style.

/opt/cni/bin/aws-eni-ipam -> aws-vpc-cni/aws-vpc-cni runs aws-eni-ipam. Each program imports only
its own module, so a plugin pays for nothing it does not use. `aws-vpc-cni NAME ARGS...` works too.
"""

import os
import sys

PROGRAMS = {
    "aws-eni-ipam": "aws_eni_ipam.main",
    "aws-vpc-bridge": "aws_vpc_bridge.main",
    "aws-snat": "aws_snat.main",
    "portmap-compat": "portmap_compat.main",
    "aws-vpc-cni-agent": "aws_vpc_cni_agent.main",
}


def main() -> None:
    name = os.path.basename(sys.argv[0])
    if name not in PROGRAMS and len(sys.argv) > 1 and sys.argv[1] in PROGRAMS:
        name = sys.argv.pop(1)
        sys.argv[0] = name
    if name not in PROGRAMS:
        sys.stderr.write(f"aws-vpc-cni bundle: run me as one of {', '.join(PROGRAMS)} "
                         f"(a link with that name, or 'aws-vpc-cni NAME ...')\n")
        sys.exit(2)
    module = __import__(PROGRAMS[name], fromlist=["main"])
    sys.exit(module.main())


if __name__ == "__main__":
    main()
