//! Where objects come from: a folder of manifests (standalone mode) or the API server (cluster
//! mode).
pub mod cluster;
pub mod manifests;
