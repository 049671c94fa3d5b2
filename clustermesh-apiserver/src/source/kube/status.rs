//! MCS status write-back: `ServiceExport` conditions and `ServiceImport`s (KEP-1645).

/// API group of the Multi-Cluster Services API.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
