"""The cluster test bed: three hosts in network namespaces, a three-node NATS cluster, faults (issue 13)."""
