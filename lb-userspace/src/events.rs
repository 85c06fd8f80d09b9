//! Datapath events: which ones the programs send (switched at run time through a map), and
//! the agent's reader that puts them in its log.
use std::sync::Arc;

use aya::maps::{Array, MapData};
use lb_common::{EVENTS_DROPS, EVENTS_FLOWS, EVENTS_OFF};
use serde::{Deserialize, Serialize};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

/// Which datapath events the programs send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsLevel {
    /// None (the default): the programs test the level where an event could be sent, and
    /// send nothing.
    #[default]
    Off,
    /// Every dropped packet, with its reason.
    Drops,
    /// Drops, and the backend every new flow gets (tracing: one event per new flow).
    Flows,
}

impl EventsLevel {
    pub fn map_value(self) -> u32 {
        match self {
            EventsLevel::Off => EVENTS_OFF,
            EventsLevel::Drops => EVENTS_DROPS,
            EventsLevel::Flows => EVENTS_FLOWS,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventsLevel::Off => "off",
            EventsLevel::Drops => "drops",
            EventsLevel::Flows => "flows",
        }
    }
}

impl std::str::FromStr for EventsLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as clap::ValueEnum>::from_str(s.trim(), true)
            .map_err(|_| format!("datapath events {s:?}: expected off, drops or flows"))
    }
}

/// The events level in the pinned map, written apart from the dataplane (by the admin
/// endpoint).
pub struct EventsSwitch(Array<MapData, u32>);

impl EventsSwitch {
    pub fn new(map: Array<MapData, u32>) -> Self {
        Self(map)
    }

    pub fn set(&mut self, level: EventsLevel) -> Result<(), aya::maps::MapError> {
        self.0.set(0, level.map_value(), 0)
    }
}

/// Puts the programs' events in the agent's log, as `datapath: <event>`.
pub struct DatapathLog;

impl log::Log for DatapathLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        match record.level() {
            log::Level::Error | log::Level::Warn => warn!("datapath: {}", record.args()),
            _ => info!("datapath: {}", record.args()),
        }
    }

    fn flush(&self) {}
}

/// Reads the programs' events as they come and logs them, until the agent stops.
pub fn spawn_reader<L: log::Log + Send + Sync + 'static>(
    logger: aya_log::EbpfLogger<L>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns the ring buffer's descriptor and keeps it open, unchanged, for
    // as long as it lives, which is as long as the AsyncFd that owns it.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("datapath events: {}", std::io::Error::from(e)))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut ready) = fd.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}

/// A logger that keeps the events' text (tests).
#[derive(Clone, Default)]
pub struct CapturedEvents(pub Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for CapturedEvents {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        if let Ok(mut events) = self.0.lock() {
            events.push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}
