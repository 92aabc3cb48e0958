"""What the real runtimes send to a CNI plugin, exactly, with where in their source it is made
(ARCHITECTURE section 9 has it measured on this machine). Used by the CNI_ARGS and portMappings tests.
"""

# containerd 1.6 CRI: pkg/cri/server/sandbox_run.go toCNILabels (K8S_POD_NAMESPACE, K8S_POD_NAME,
# K8S_POD_INFRA_CONTAINER_ID = the sandbox ID, K8S_POD_UID, IgnoreUnknown=1) -> go-cni WithLabels;
# go-cni's Namespace.config ranges over that Go map, so the order changes from call to call; libcni's
# invoke.Args.AsEnv joins the pairs with '=' and ';'.
CONTAINERD_SANDBOX_ID = "4f7a1c2d9e8b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f"
CONTAINERD_CNI_ARGS = [
    "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-7d4b9c8f5-x2x7q;"
    f"K8S_POD_INFRA_CONTAINER_ID={CONTAINERD_SANDBOX_ID};K8S_POD_UID=8d3f2b1a-7c6e-4d5f-9a8b-1c2d3e4f5a6b;IgnoreUnknown=1",
    "IgnoreUnknown=1;K8S_POD_UID=8d3f2b1a-7c6e-4d5f-9a8b-1c2d3e4f5a6b;K8S_POD_NAME=web-7d4b9c8f5-x2x7q;"
    f"K8S_POD_NAMESPACE=kube-system;K8S_POD_INFRA_CONTAINER_ID={CONTAINERD_SANDBOX_ID}",
]
# containerd's runtimeConfig.portMappings entry: go-cni's PortMapping struct has no JSON tags, so libcni
# marshals its field names (HostPort, ContainerPort, Protocol, HostIP); HostIP "" when the pod gives none.
CONTAINERD_PORT_MAPPING = {"HostPort": 18080, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""}

# podman 4.3, CNI backend: containers/common libnetwork/cni/run.go getRuntimeConfig: IgnoreUnknown=1 and
# K8S_POD_NAME=<container name> (no K8S_POD_NAMESPACE: podman#12083), then the pairs of podman's own
# CNI_ARGS environment, MAC=<mac> with --mac-address and IP=<ip> with a single --ip. Its portMappings
# entries are tagged hostPort, containerPort, protocol, hostIP (libnetwork/cni/cni_types.go).
PODMAN_CNI_ARGS = [
    "IgnoreUnknown=1;K8S_POD_NAME=eager_hamilton",
    "IgnoreUnknown=1;K8S_POD_NAME=probe1;MAC=02:42:ac:11:00:02;IP=10.88.0.5",
]
