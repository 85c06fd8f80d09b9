// Intentionally empty: cargo ignores a bin-only build dependency, so this lib target makes
// edits to lb-common rebuild the eBPF object (see TOOLCHAIN.md).
#![no_std]
