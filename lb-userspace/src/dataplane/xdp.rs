//! The XDP program on external links (`--xdp-mode`): attached natively where the driver
//! can, else generically, else not at all (the TC external program then does the same work);
//! pinned like the TC links, so it outlives the agent.
use std::path::{Path, PathBuf};

use aya::programs::{Xdp, XdpMode as AttachMode, links::FdLink};

use super::{Dataplane, DataplaneError, LINKS_DIR, Result, XDP_PROGRAM};

/// `--xdp-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver, before the kernel allocates an skb; where the driver cannot, generic.
    #[default]
    Native,
    /// In the kernel's generic hook (any link; an skb is allocated first).
    Generic,
    /// No XDP: the TC external program serves the traffic.
    Off,
}

const PIN_PREFIX: &str = "xdp-";

/// How XDP ended up on one link, and the attempts that failed on the way.
pub struct XdpAttachment {
    /// "native", "generic" or "off".
    pub mode: &'static str,
    pub failures: Vec<String>,
}

impl Dataplane {
    /// An XDP program of the object, by name.
    pub fn xdp_program(&mut self, name: &'static str) -> Result<&mut Xdp> {
        self.program(name)
    }

    pub(super) fn load_xdp(&mut self, name: &'static str) -> Result<()> {
        self.xdp_program(name)?
            .load()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Attaches the XDP program to `name` in the first mode that works, from `wanted` down.
    /// An interface holds one XDP program: a previous agent's goes first (the TC program
    /// serves the link meanwhile).
    pub(super) fn attach_xdp(
        &mut self,
        ifindex: u32,
        name: &str,
        wanted: XdpMode,
    ) -> Result<XdpAttachment> {
        let mut failures = Vec::new();
        let wanted = if wanted == XdpMode::Native && driver(name).as_deref() == Some("veth") {
            // veth accepts a native program, but the frames it sends back (XDP_TX) do not
            // reach the peer here even with GRO on there: generic mode sends them as skbs.
            failures.push(format!(
                "XDP native on {name}: veth does not deliver XDP_TX frames to its peer"
            ));
            XdpMode::Generic
        } else {
            wanted
        };
        let tries: &[(AttachMode, &'static str)] = match wanted {
            XdpMode::Native => &[(AttachMode::Driver, "native"), (AttachMode::Skb, "generic")],
            XdpMode::Generic => &[(AttachMode::Skb, "generic")],
            XdpMode::Off => &[],
        };
        let links = self.bpffs.as_ref().map(|b| b.join(LINKS_DIR));
        if let Some(dir) = &links {
            for (old, path) in xdp_pins(dir)? {
                if old == ifindex {
                    std::fs::remove_file(path)?;
                }
            }
        }
        for (mode, label) in tries {
            let attached = self
                .xdp_program(XDP_PROGRAM)?
                .attach_to_if_index(ifindex, *mode);
            let id = match attached {
                Ok(id) => id,
                Err(e) => {
                    failures.push(format!("XDP {label} on {name}: {e}"));
                    continue;
                }
            };
            let link = self
                .xdp_program(XDP_PROGRAM)?
                .take_link(id)
                .map_err(|source| DataplaneError::Program {
                    name: XDP_PROGRAM,
                    source,
                })?;
            match (&links, FdLink::try_from(link)) {
                (Some(dir), Ok(fd_link)) => {
                    let pin = dir.join(format!("{PIN_PREFIX}{ifindex}-{label}"));
                    fd_link.pin(&pin).map_err(|e| DataplaneError::Attach {
                        iface: name.to_string(),
                        message: e.to_string(),
                    })?;
                }
                // Unpinned (tests), or a kernel without XDP links (before 5.9, attached by
                // netlink): it stays attached after this process.
                (_, Ok(fd_link)) => std::mem::forget(fd_link),
                (_, Err(_)) => {}
            }
            return Ok(XdpAttachment {
                mode: label,
                failures,
            });
        }
        Ok(XdpAttachment {
            mode: "off",
            failures,
        })
    }
}

/// The driver of a link, as `ethtool -i` names it (ETHTOOL_GDRVINFO).
fn driver(name: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: a datagram socket for the ioctl, closed below; `request` points at `info`,
    // which outlives the call and is as large as the kernel's ethtool_drvinfo.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if socket < 0 {
            return None;
        }
        let result = libc::ioctl(socket, libc::SIOCETHTOOL, &mut request);
        libc::close(socket);
        if result < 0 {
            return None;
        }
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Pinned XDP links under `dir`: (ifindex, path).
pub(super) fn xdp_pins(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    super::pins_named(dir, PIN_PREFIX)
}
