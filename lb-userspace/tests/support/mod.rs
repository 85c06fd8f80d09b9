//! Shared helpers of the privileged integration tests.
pub mod datapath;
pub mod packet;
