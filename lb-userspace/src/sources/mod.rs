//! Where objects come from. Standalone mode reads a folder of manifests.
pub mod manifests;
