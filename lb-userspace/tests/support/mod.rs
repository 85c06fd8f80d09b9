//! Shared helpers of the privileged integration tests.
pub mod bed;
pub mod datapath;
pub mod packet;
