//! Deterministic cluster simulation: nodes, a ZooKeeper-timed lease service, virtual clock, faults.
