//! Batched map access (BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, Linux 5.6), which aya
//! 0.14 does not offer: one system call for thousands of entries where a sync of 100,000
//! Services otherwise makes two million, each paying the kernel's entry and exit.
use std::{
    hash::BuildHasher as _,
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per system call: large enough that the call's own cost vanishes, small enough that
/// the kernel's copy of keys and values stays a few hundred KiB.
const CHUNK: usize = 8192;
/// Threads a large write is shared among, at most, and the entries each takes at least (below
/// that, a thread costs more than it saves).
const MAX_WRITERS: usize = 4;
const PER_WRITER: usize = 4 * CHUNK;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr.batch` whose pointers the caller keeps alive.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes `entries` into the map (keys and values as the map's layout, plain old data). A large
/// write (a first sync writes a million backends) is shared among threads, as the kernel takes
/// updates of one map from several CPUs at once; each key goes to one thread, so that two writes
/// of one key stay in their order.
pub fn update<K: bytemuck::Pod + Sync, V: bytemuck::Pod + Sync>(
    map: BorrowedFd<'_>,
    entries: &[(K, V)],
) -> io::Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WRITERS)
        .min(entries.len() / PER_WRITER)
        .max(1);
    if threads == 1 {
        return update_in_order(map, entries);
    }
    let mut shares: Vec<Vec<(K, V)>> = (0..threads)
        .map(|_| Vec::with_capacity(entries.len() / threads + 1))
        .collect();
    let hasher = foldhash::fast::FixedState::with_seed(0);
    for entry in entries {
        let writer = hasher.hash_one(bytemuck::bytes_of(&entry.0));
        shares[writer as usize % threads].push(*entry);
    }
    std::thread::scope(|scope| {
        let (mine, others) = shares.split_first().expect("two shares or more");
        let handles: Vec<_> = others
            .iter()
            .map(|share| scope.spawn(move || update_in_order(map, share)))
            .collect();
        let mut result = update_in_order(map, mine);
        for handle in handles {
            let written = handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            result = result.and(written);
        }
        result
    })
}

fn update_in_order<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    entries: &[(K, V)],
) -> io::Result<()> {
    for chunk in entries.chunks(CHUNK) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count as usize != chunk.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {} of {} entries",
                attr.count,
                chunk.len()
            )));
        }
    }
    Ok(())
}

/// Deletes `keys` from the map (all of them must be there).
pub fn delete<K: bytemuck::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    for chunk in keys.chunks(CHUNK) {
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_DELETE_BATCH, &mut attr)?;
        if attr.count as usize != chunk.len() {
            return Err(io::Error::other(format!(
                "batch delete removed {} of {} entries",
                attr.count,
                chunk.len()
            )));
        }
    }
    Ok(())
}

/// Every entry of the map (a hash map's, or an array's whole range).
pub fn lookup_all<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    // The position token: a bucket (hash maps) or an index (arrays); 8 bytes hold either.
    let mut token = [0u64; 1];
    let mut next = [0u64; 1];
    let mut keys: Vec<K> = vec![K::zeroed(); CHUNK];
    let mut values: Vec<V> = vec![V::zeroed(); CHUNK];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        match result {
            Ok(()) => {}
            // The end of the map: the entries before it were returned.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}
