"""The multi-node testbed on one machine: network namespaces, shaped links, interface counters."""
