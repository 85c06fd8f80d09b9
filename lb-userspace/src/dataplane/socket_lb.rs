//! Connect-time load balancing (`--socket-lb`, `--cgroup`): the cgroup sock_addr programs,
//! attached to one cgroup v2 and pinned like the TC links, so that they outlive the agent.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};

use super::{Dataplane, DataplaneError, LINKS_DIR, Result};

/// The programs and the hooks they are attached at.
pub const SOCK_PROGRAMS: [(&str, &str); 4] = [
    ("lb_sock_connect4", "connect4"),
    ("lb_sock_sendmsg4", "sendmsg4"),
    ("lb_sock_recvmsg4", "recvmsg4"),
    ("lb_sock_getpeername4", "getpeername4"),
];

/// Pins are named `sock-<hook>-<cgroup inode>-<program id>`.
const PIN_PREFIX: &str = "sock-";
const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

fn cgroup_error(cgroup: &Path, message: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Attach {
        iface: format!("cgroup {}", cgroup.display()),
        message: message.to_string(),
    }
}

impl Dataplane {
    fn sock_program(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr> {
        self.program(name)
    }

    /// Attaches the socket programs to the cgroup v2 at `cgroup` (every process in it and in
    /// the cgroups below), loading them first. Pinned, the attachment outlives the agent;
    /// the previous agent's (at this cgroup or another) is released once this one holds, so
    /// no connect() goes untranslated meanwhile.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<()> {
        let dir = std::fs::File::open(cgroup).map_err(|e| cgroup_error(cgroup, e))?;
        if !is_cgroup2_dir(cgroup) {
            return Err(cgroup_error(cgroup, "not a cgroup v2 directory"));
        }
        let inode = dir.metadata()?.ino();
        let mut pinned = Vec::new();
        for (name, hook) in SOCK_PROGRAMS {
            let program = self.sock_program(name)?;
            if program.fd().is_err() {
                program
                    .load()
                    .map_err(|source| DataplaneError::Program { name, source })?;
            }
            let id = program.info().map_err(|e| cgroup_error(cgroup, e))?.id();
            // Links to cgroups always allow other programs beside them (no flags).
            let link_id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| cgroup_error(cgroup, e))?;
            let link = program
                .take_link(link_id)
                .map_err(|e| cgroup_error(cgroup, e))?;
            match &self.bpffs {
                Some(bpffs) => {
                    let fd_link: FdLink = link
                        .try_into()
                        .map_err(|e: aya::programs::links::LinkError| cgroup_error(cgroup, e))?;
                    let pin = bpffs
                        .join(LINKS_DIR)
                        .join(format!("{PIN_PREFIX}{hook}-{inode}-{id}"));
                    if pin.exists() {
                        std::fs::remove_file(&pin)?;
                    }
                    fd_link.pin(&pin).map_err(|e| cgroup_error(cgroup, e))?;
                    pinned.push(pin);
                }
                // Unpinned (tests): attached as long as this process lives.
                None => std::mem::forget(link),
            }
        }
        if let Some(bpffs) = &self.bpffs {
            for old in sock_pins(&bpffs.join(LINKS_DIR))? {
                if !pinned.contains(&old) {
                    std::fs::remove_file(old)?;
                }
            }
        }
        self.socket_lb = Some(cgroup.to_path_buf());
        Ok(())
    }

    /// Detaches the socket programs a previous agent left (`--socket-lb=false`): every client
    /// goes through the TC programs again. Returns how many attachments were released.
    pub fn detach_socket_lb(&mut self) -> Result<usize> {
        let Some(bpffs) = &self.bpffs else {
            return Ok(0);
        };
        let pins = sock_pins(&bpffs.join(LINKS_DIR))?;
        for pin in &pins {
            std::fs::remove_file(pin)?;
        }
        self.socket_lb = None;
        Ok(pins.len())
    }

    /// The cgroup the socket programs are attached to, if they are.
    pub fn socket_lb(&self) -> Option<&Path> {
        self.socket_lb.as_deref()
    }
}

/// The socket programs' pins under `dir`.
pub(super) fn sock_pins(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut pins = Vec::new();
    if !dir.exists() {
        return Ok(pins);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(PIN_PREFIX))
        {
            pins.push(path);
        }
    }
    Ok(pins)
}

/// Whether `path` is a directory of a cgroup v2 file system.
pub fn is_cgroup2_dir(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut fs) == 0 && fs.f_type == CGROUP2_SUPER_MAGIC
    }
}

/// Where cgroup v2 is mounted (its root), from `/proc/self/mountinfo`: `--cgroup`'s default.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount(&mountinfo)
}

/// The mount point of the first cgroup2 file system in a mountinfo table.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - type ...
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && let Ok(byte) = u8::from_str_radix(digits, 8)
        {
            out.push(byte);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_a_hybrid_or_unified_mountinfo() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
29 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:9 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let spaced = "29 25 0:26 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(spaced), Some(PathBuf::from("/mnt/my cgroup")));
        assert_eq!(cgroup2_mount(&hybrid.replace("cgroup2", "cgroup")), None);
    }
}
