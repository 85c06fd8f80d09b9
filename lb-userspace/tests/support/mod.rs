//! Shared helpers of the privileged integration tests.
pub mod apiserver;
pub mod bed;
pub mod datapath;
pub mod packet;
pub mod uplink;
pub mod web;
